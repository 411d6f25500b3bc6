"""Progress where a user waits: one way to report it.

On an interactive terminal (the stream is a TTY) a tqdm bar with the rate and the time left;
anywhere else (CI, ``ray job submit`` logs, a file, Ray tasks and actors, whose output is never
a TTY) a plain line every ``step`` percent and one at the end, e.g.::

    convert train: 40% (1600/4000 images), 210 images/s, 11 s left
    convert train: 100% (4000/4000 images), 208 images/s, done in 19 s

No carriage return or ANSI code in the plain lines. On an error inside ``with Progress(...)``
the plain lines stop (nothing comes after the error) and a bar is left where it stands.

:func:`quiet_ray_data` sets Ray Data's own progress reporting for the same two cases.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, TextIO


def is_interactive(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (False for a closed stream or one without isatty)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def duration(seconds: float) -> str:
    """``12 s``, ``3 min 05 s``, ``2 h 07 min`` (to the nearest second)."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def rate_text(rate: float, unit: str) -> str:
    """``210 images/s``; ``0.5 tiles/s`` below 10 per second."""
    return f"{rate:,.0f} {unit}/s" if rate >= 10 else f"{rate:.2g} {unit}/s"


class Progress:
    """``done`` of ``total`` units of one task, reported to ``stream`` (default stderr).

    what: the task, first on each line (``convert train``); total: the units to do (None or
    0 when unknown or empty: never crashes, the lines give no percent then); start: units
    already done before this run (a resumed evaluation), left out of the rate; step: percent
    between two plain lines; min_interval: at least these seconds between two plain lines
    (a task of a second gets its last line only); interval: seconds between two plain lines
    when the total is unknown; interactive: a bar (True) or plain lines (False), default
    whether ``stream`` is a TTY; note: text after the counts (``4 already done``); clock:
    seconds (tests).
    Use as a context manager, or call :meth:`update` and then :meth:`close`.
    """

    def __init__(
        self,
        what: str,
        total: int | None,
        unit: str = "images",
        *,
        start: int = 0,
        step: float = 5.0,
        min_interval: float = 1.0,
        interval: float = 30.0,
        interactive: bool | None = None,
        note: str = "",
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if step <= 0:
            raise ValueError(f"step must be above 0 percent, got {step}")
        self.what, self.total, self.unit, self.note = what, total, unit, note
        self.step, self.min_interval, self.interval = step, min_interval, interval
        self.clock = clock
        self.stream = stream if stream is not None else sys.stderr
        self.done = self.start = max(0, start)
        self.t0 = self.last_time = clock()
        self.last_step = self._steps()
        self.closed = False
        self.summary = ""  # set before the end: after the last line's counts
        tty = is_interactive(self.stream) if interactive is None else interactive
        self.bar: Any = self._bar() if tty else None

    def _bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=self.total or None,
            initial=self.done,
            desc=self.what,
            unit=f" {self.unit}",
            file=self.stream,
            dynamic_ncols=True,
            leave=True,
            postfix=self.note or None,
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=kind is not None)

    def _steps(self) -> int:
        """Whole steps of percent done (-1 when the total is unknown)."""
        if not self.total:
            return -1
        return int(100 * min(self.done, self.total) / self.total // self.step)

    def update(self, n: int = 1) -> None:
        """``n`` more units done; a plain line when a step of percent (or, total unknown,
        ``interval`` seconds) has passed since the last one."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now, steps = self.clock(), self._steps()
        finished = bool(self.total) and self.done >= (self.total or 0)
        if finished:
            return  # the last line is close()'s
        since = now - self.last_time
        if self.total:
            due = steps > self.last_step and since >= self.min_interval
        else:
            due = since >= self.interval
        if due:
            self.last_step, self.last_time = steps, now
            self._print(self.line(now))

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The plain line for the progress so far."""
        now = self.clock() if now is None else now
        elapsed = max(now - self.t0, 1e-9)
        new = self.done - self.start
        rate = new / elapsed
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        count = f"{count} {self.unit}" + (f", {self.note}" if self.note else "")
        head = f"{self.what}: "
        head += f"{100 * self.done // self.total}% ({count})" if self.total else count
        parts = [head]
        if new > 0:
            parts.append(rate_text(rate, self.unit))
        if final:
            summary = f"; {self.summary}" if self.summary else ""
            parts.append(f"done in {duration(elapsed)}{summary}")
        elif self.total and new > 0:
            parts.append(f"{duration((self.total - self.done) / rate)} left")
        return ", ".join(parts)

    def close(self, failed: bool = False) -> None:
        """The last line (or the bar's last state); nothing more when ``failed``."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            if self.summary and not failed:
                tail = f"{self.note}; {self.summary}" if self.note else self.summary
                self.bar.set_postfix_str(tail, refresh=False)
            self.bar.close()
        elif not failed:
            self._print(self.line(final=True))

    def _print(self, line: str) -> None:
        print(line, file=self.stream, flush=True)


def quiet_ray_data(ctx: Any = None, *, own_progress: bool = False) -> None:
    """Ray Data's progress reporting for a job's log (``ctx``: a DataContext, default the
    current one, before the datasets are made).

    ``own_progress``: the job reports this dataset's progress itself (a :class:`Progress`),
    so Ray Data's would say the same twice: off. Otherwise, on a terminal, Ray Data's own
    bars; in a non-interactive log, Ray Data's plain lines instead of bars: tqdm bars drawn
    for Ray workers (``use_ray_tqdm``) would fill a log with carriage returns, and one
    line per operator stays readable.
    """
    if ctx is None:
        from ray.data import DataContext

        ctx = DataContext.get_current()
    if own_progress:
        ctx.enable_progress_bars = False
        return
    if not is_interactive(sys.stdout):
        ctx.use_ray_tqdm = False
        ctx.enable_operator_progress_bars = False


class _CheckpointCreated(logging.Filter):
    """Drops Ray Train's line for each checkpoint it persisted (the epoch line says it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Checkpoint successfully created at")


def quiet_ray_train_reports() -> None:
    """Ray Train's per-report line ("Reporting training result N: <the report's ~60 metrics>
    from rank R", logged at INFO by each worker through a logger named after its source file)
    off the console: that logger keeps Ray's log files (the root logger's file handlers) and
    no longer reaches the job's output; its line for each persisted checkpoint is dropped. Call
    it in a Ray Train worker (idempotent)."""
    import logging

    from ray.train.v2._internal.execution import context, storage

    saved = logging.getLogger(storage.__name__)  # "Checkpoint successfully created at: ..."
    if not any(isinstance(f, _CheckpointCreated) for f in saved.filters):
        saved.addFilter(_CheckpointCreated())
    logger = logging.getLogger(context.__file__)
    logger.propagate = False
    for handler in logging.getLogger().handlers:
        console = isinstance(handler, logging.StreamHandler) and not isinstance(
            handler, logging.FileHandler
        )
        if not console and handler not in logger.handlers:
            logger.addHandler(handler)
