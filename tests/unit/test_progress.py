"""shan.progress: plain lines in a log, a tqdm bar on a terminal."""

from __future__ import annotations

import io
import logging
import os
import re
from types import SimpleNamespace

import pytest

from shan.progress import Progress, duration, quiet_ray_data

LINE = re.compile(
    r"^convert train: (\d+)% \((\d+)/4000 images\), [\d,.]+ images/s, "
    r"(\d+ s|\d+ min \d\d s) left$"
)


class Clock:
    """Seconds that move when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def run(total: int | None, chunk: int, **kw) -> list[str]:
    stream, clock = io.StringIO(), Clock()
    with Progress("convert train", total, "images", stream=stream, clock=clock, **kw) as p:
        for _ in range(0, total or 1000, chunk):
            clock.now += 0.5
            p.update(chunk)
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    return stream.getvalue().splitlines()


def test_a_log_gets_a_line_every_step_of_percent_with_time_left_and_a_last_at_100():
    lines = run(4000, 40)  # 100 updates of 1%, 0.5 s each: 80 images/s
    *steps, last = lines
    assert len(steps) == 19  # 5%, 10%, ... 95%; 100% is the last line
    percents = []
    for line in steps:
        m = LINE.match(line)
        assert m, line
        percents.append(int(m[1]))
        assert int(m[1]) == 100 * int(m[2]) // 4000
    assert percents == list(range(5, 100, 5))
    assert steps[7] == "convert train: 40% (1600/4000 images), 80 images/s, 30 s left"
    assert last == "convert train: 100% (4000/4000 images), 80 images/s, done in 50 s"


def test_the_step_is_configurable_and_big_updates_give_one_line_each():
    assert len(run(4000, 40, step=25)) == 4  # 25, 50, 75, then 100
    assert len(run(4000, 1000, min_interval=0)) == 4  # 25, 50, 75 (a line per update), 100


def test_a_task_of_a_second_gets_its_last_line_only():
    lines = run(4000, 40, step=5, min_interval=60)  # 50 s in all, lines at most a minute apart
    assert len(lines) == 1 and lines[0].startswith("convert train: 100% (4000/4000 images)")
    assert len(run(4000, 40, min_interval=5)) == 10  # 5 s apart: every 10%, and the last


def test_a_summary_ends_the_last_line():
    stream = io.StringIO()
    with Progress("generate dev", 3, stream=stream, clock=Clock()) as p:
        p.update(3)
        p.summary = "15 captions"
    assert stream.getvalue().endswith("done in 0 s; 15 captions\n")


def test_an_error_stops_the_lines_so_the_error_line_comes_last():
    stream = io.StringIO()
    with pytest.raises(KeyError), Progress("x", 10, stream=stream, step=10, min_interval=0) as p:
        p.update(5)
        raise KeyError("boom")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("x: 50% (5/10 images), ")


def test_a_total_of_zero_or_unknown_does_not_crash():
    stream = io.StringIO()
    with Progress("convert empty", 0, stream=stream):
        pass
    assert stream.getvalue() == "convert empty: 0 images, done in 0 s\n"
    lines = run(None, 100, interval=2)  # 10 updates, 0.5 s apart: a line every 2 s
    assert len(lines) == 3 and lines[0] == "convert train: 400 images, 200 images/s"
    assert lines[-1] == "convert train: 1000 images, 200 images/s, done in 5 s"


def test_resumed_work_counts_what_was_done_before_but_not_in_the_rate():
    stream, clock = io.StringIO(), Clock()
    with Progress("score model 0", 10, "tiles", start=4, note="4 already done",
                  stream=stream, clock=clock, step=10) as p:  # fmt: skip
        clock.now += 2
        p.update()
    first = stream.getvalue().splitlines()[0]
    assert first == "score model 0: 50% (5/10 tiles, 4 already done), 0.5 tiles/s, 10 s left"


def test_a_terminal_gets_a_tqdm_bar():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    with Progress("extract images", 8, stream=stream) as p:
        assert p.bar is not None
        for _ in range(8):
            p.update()
    out = stream.getvalue()
    assert "\r" in out and "extract images: 100%" in out and "8/8" in out


def test_a_real_pty_is_interactive():
    master, slave = os.openpty()
    try:
        with os.fdopen(slave, "w") as tty:
            p = Progress("x", 2, stream=tty)
            assert p.bar is not None
            p.close()
    finally:
        os.close(master)


def test_a_stream_without_isatty_or_closed_is_a_log():
    closed = io.StringIO()
    closed.close()
    assert Progress("x", 1, stream=closed).bar is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (11.2, "11 s"), (59.7, "1 min 00 s"), (185, "3 min 05 s"), (7260, "2 h 01 min")],
)
def test_durations_read_well(seconds, text):
    assert duration(seconds) == text


def test_ray_data_reports_plainly_in_a_log_and_not_at_all_beside_our_own():
    ctx = SimpleNamespace(  # ray.data.DataContext's defaults (importing Ray Data takes seconds)
        enable_progress_bars=True, use_ray_tqdm=True, enable_operator_progress_bars=True
    )
    quiet_ray_data(ctx)  # pytest's stdout is not a terminal
    assert ctx.enable_progress_bars and not ctx.use_ray_tqdm
    assert not ctx.enable_operator_progress_bars
    quiet_ray_data(ctx, own_progress=True)
    assert not ctx.enable_progress_bars


def test_ray_trains_per_report_line_keeps_its_log_file_and_leaves_the_console():
    from ray.train.v2._internal.execution import context, storage

    from shan.progress import quiet_ray_train_reports

    root, logger = logging.getLogger(), logging.getLogger(context.__file__)
    console, logfile = logging.StreamHandler(io.StringIO()), Kept()
    before = root.handlers[:], logger.propagate, logger.handlers[:]
    root.handlers[:] = [console, logfile]  # as Ray Train sets a worker's root logger
    try:
        quiet_ray_train_reports()
        quiet_ray_train_reports()  # idempotent
        logger.warning("Reporting training result 1: {'train/loss': 0.5, ...} from rank 0")
        saved, kept = logging.getLogger(storage.__name__), Kept()
        saved.addHandler(kept)
        try:
            saved.warning("Checkpoint successfully created at: Checkpoint(filesystem=local, ...)")
            saved.warning("Failed to upload the checkpoint")  # anything else still shows
        finally:
            saved.removeHandler(kept)
        assert [r.getMessage() for r in kept.records] == ["Failed to upload the checkpoint"]
        logging.getLogger("shan.other").warning("the job's own line")
        assert console.stream.getvalue() == "the job's own line\n"
        messages = [r.getMessage() for r in logfile.records]
        assert messages[0].startswith("Reporting training result 1")
        assert messages[1:] == ["the job's own line"]
    finally:
        root.handlers[:], logger.propagate, logger.handlers[:] = before


class Kept(logging.Handler):
    """A handler that is not a console stream (as Ray's session log file handler)."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
