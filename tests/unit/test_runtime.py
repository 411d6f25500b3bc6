"""Sizing groups of Ray workers and actors, the loopback switch, Ray failures on one line, and
an interrupted Ray Data thread kept off the console (no Ray started: clusters are dicts,
failures are objects shaped like Ray's)."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace

import pytest

from shan import runtime
from shan.config import ConfigError, ScalingConfig
from shan.data.format import DataError
from shan.eval.job import EvalOptions, actor_request
from shan.runtime import (
    RAY_LOOPBACK,
    GroupRequest,
    Resources,
    ask_group,
    failure_line,
    keep_ray_on_loopback,
    on_cluster,
    plan_group,
    quiet_threads,
    size_group,
    training_request,
    worker_errors,
)


def fields(r: Resources) -> tuple:
    return r.count, r.use_gpu, r.cpus_each, r.gpus_each, r.torch_threads


# -- training workers -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cpus", "want"),
    [
        # one worker per 4 CPUs, one CPU left to Ray Data, threads = CPUs / workers
        (1, (1, False, 0.5, 0.0, 1)),  # half a CPU left on the smallest machine
        (2, (1, False, 1.0, 0.0, 2)),
        (8, (2, False, 3.5, 0.0, 4)),
        (64, (16, False, 3.94, 0.0, 4)),  # (64 - 1) / 16 rounded to 2 places
    ],
)
def test_training_on_cpus_is_guessed(cpus, want):
    r = size_group(training_request(ScalingConfig()), {"CPU": float(cpus)})
    assert fields(r) == want
    assert r.cpus_each * r.count <= cpus - 0.5  # something is left for Ray Data's reads


def test_a_huge_cpu_machine_caps_cpus_per_worker():
    r = size_group(training_request(ScalingConfig(num_workers=2)), {"CPU": 256.0})
    assert r.cpus_each == 8.0  # at most 8 CPUs each


def test_training_on_gpus_counts_gpus():
    r = size_group(training_request(ScalingConfig()), {"CPU": 64.0, "GPU": 8.0})
    assert fields(r) == (8, True, 7.88, 1.0, 7)  # threads: the whole CPUs of each worker
    assert r.ray_resources() == {"CPU": 7.88, "GPU": 1.0}


def test_fractional_and_multiple_gpus_per_worker():
    half = size_group(training_request(ScalingConfig(gpus_per_worker=0.5)), {"CPU": 8, "GPU": 2})
    assert (half.count, half.gpus_each) == (4, 0.5)
    two = size_group(training_request(ScalingConfig(gpus_per_worker=2.0)), {"CPU": 8, "GPU": 8})
    assert (two.count, two.gpus_each) == (4, 2.0)
    assert two.ray_resources()["GPU"] == 2.0


def test_use_gpu_false_on_a_gpu_cluster_uses_cpus():
    r = size_group(training_request(ScalingConfig(use_gpu=False)), {"CPU": 8.0, "GPU": 4.0})
    assert fields(r) == (2, False, 3.5, 0.0, 4)
    assert r.ray_resources() == {"CPU": 3.5}  # no GPU key at all


def test_explicit_counts_and_cpus_are_respected():
    sc = ScalingConfig(num_workers=2, cpus_per_worker=0.5)
    assert fields(size_group(training_request(sc), {"CPU": 2.0})) == (2, False, 0.5, 0.0, 1)
    sc = ScalingConfig(num_workers=3)
    r = size_group(training_request(sc), {"CPU": 8.0})
    assert (r.count, r.cpus_each, r.torch_threads) == (3, 2.33, 2)  # (8 - 1) / 3
    sc = ScalingConfig(num_workers=2, cpus_per_worker=1.5, use_gpu=True)
    r = size_group(training_request(sc), {"CPU": 16.0, "GPU": 4.0})
    assert fields(r) == (2, True, 1.5, 1.0, 1)


def test_a_missing_cpu_entry_counts_as_one_cpu():
    assert fields(size_group(GroupRequest(), {})) == (1, False, 0.5, 0.0, 1)


@pytest.mark.parametrize(
    ("sc", "cluster", "numbers"),
    [
        (ScalingConfig(num_workers=4, cpus_per_worker=1.0), {"CPU": 2.0}, "(4 x 1 CPU)"),
        (ScalingConfig(num_workers=9), {"CPU": 2.0}, "(9 x 0.25 CPU)"),  # the 0.25 floor
        (ScalingConfig(cpus_per_worker=3.0), {"CPU": 2.0}, "(1 x 3 CPU)"),
    ],
)
def test_more_cpus_than_the_cluster_is_a_config_error(sc, cluster, numbers):
    with pytest.raises(ConfigError) as e:
        size_group(training_request(sc), cluster)
    text = str(e.value)
    assert text.startswith("scaling.num_workers x scaling.cpus_per_worker")
    assert numbers in text and "exceed the cluster's 2 CPUs" in text


def test_training_request_maps_the_scaling_section():
    sc = ScalingConfig(num_workers=3, use_gpu=True, cpus_per_worker=2.0, gpus_per_worker=0.5)
    req = training_request(sc)
    assert (req.count, req.use_gpu, req.cpus_each, req.gpus_each) == (3, True, 2.0, 0.5)
    assert req.cpus_per_member_guess == 4


# -- evaluation actors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cpus", "want"),
    [
        (2, (1, False, 2.0, 0.0, 2)),  # no CPU kept back: actors read nothing through Ray Data
        (8, (4, False, 2.0, 0.0, 2)),  # one actor per 2 CPUs
        (64, (32, False, 2.0, 0.0, 2)),
    ],
)
def test_actors_on_cpus_are_guessed(cpus, want):
    assert fields(size_group(actor_request(EvalOptions()), {"CPU": float(cpus)})) == want


def test_actors_on_gpus():
    r = size_group(actor_request(EvalOptions()), {"CPU": 32.0, "GPU": 4.0})
    assert fields(r) == (4, True, 8.0, 1.0, 8)
    r = size_group(actor_request(EvalOptions(gpus_per_actor=0.25)), {"CPU": 32.0, "GPU": 2.0})
    assert (r.count, r.gpus_each) == (8, 0.25)
    assert r.ray_resources() == {"CPU": 4.0, "GPU": 0.25}


def test_gpus_per_actor_zero_means_cpu_actors():
    req = actor_request(EvalOptions(gpus_per_actor=0.0))
    assert req.use_gpu is False
    r = size_group(req, {"CPU": 8.0, "GPU": 4.0})
    assert (r.use_gpu, r.gpus_each, r.count) == (False, 0.0, 4)
    assert "GPU" not in r.ray_resources()


def test_explicit_actors_and_cpus():
    opts = EvalOptions(actors=3, cpus_per_actor=0.5)
    r = size_group(actor_request(opts), {"CPU": 2.0})
    assert fields(r) == (3, False, 0.5, 0.0, 1)
    assert r.describe("actor") == "3 actor(s), each 0.5 CPU, 1 torch thread(s)"


def test_more_actors_than_fit_now_are_asked_for_and_wait():
    """Actors wait for room (an autoscaler may add it; --wait-timeout ends the wait), so the
    request is not refused against what the cluster has now; training workers are."""
    r = size_group(actor_request(EvalOptions(actors=3, cpus_per_actor=1.0)), {"CPU": 2.0})
    assert (r.count, r.cpus_each) == (3, 1.0)
    with pytest.raises(ConfigError, match=r"^--actors x --cpus-per-actor \(3 x 1 CPU\) exceed"):
        req = actor_request(EvalOptions(actors=3, cpus_per_actor=1.0))
        size_group(replace(req, check_fit=True), {"CPU": 2.0})


def test_describe_mentions_gpus_only_on_gpu():
    r = size_group(GroupRequest(count=2), {"CPU": 16.0, "GPU": 2.0})
    assert r.describe() == "2 worker(s), each 1 GPU + 7.5 CPU, 7 torch thread(s)"


# -- on a cluster: asked, never guessed ------------------------------------------------------------
F30K_LIKE = ScalingConfig(num_workers=2, use_gpu=True, gpus_per_worker=1.0, cpus_per_worker=6.0)


def test_on_a_cluster_the_request_is_taken_as_asked_whatever_is_up(monkeypatch):
    """An autoscaling cluster whose GPU nodes scaled to zero: the job asks for its GPU workers
    anyway (and then waits); the CPUs of the head are never used instead."""
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert on_cluster()
    r = plan_group(training_request(F30K_LIKE), {"CPU": 4.0})
    assert fields(r) == (2, True, 6.0, 1.0, 6)
    assert r.bundles() == "2 x {CPU: 6, GPU: 1}"


def test_on_a_cluster_unset_fields_take_rays_defaults(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    big = {"CPU": 256.0, "GPU": 8.0}  # not looked at
    assert fields(plan_group(training_request(ScalingConfig()), big)) == (1, False, 1.0, 0.0, 1)
    assert fields(plan_group(actor_request(EvalOptions()), big)) == (1, False, 1.0, 0.0, 1)
    gpu = plan_group(actor_request(EvalOptions(actors=4, gpus_per_actor=0.5)), big)
    assert fields(gpu) == (4, True, 1.0, 0.5, 1)
    assert gpu.bundles() == "4 x {CPU: 1, GPU: 0.5}"


def test_locally_the_group_is_sized_from_the_machine(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not on_cluster()
    assert fields(plan_group(training_request(ScalingConfig()), {"CPU": 8.0})) == (
        2, False, 3.5, 0.0, 4)  # fmt: skip
    assert plan_group(training_request(ScalingConfig()), None) == ask_group(GroupRequest())


@pytest.mark.parametrize(
    ("sc", "gpus"),
    [(ScalingConfig(use_gpu=True), 0.0), (ScalingConfig(num_workers=2, use_gpu=True), 1.0)],
)
def test_locally_a_gpu_ask_without_the_gpus_is_a_config_error(monkeypatch, sc, gpus):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(
        ConfigError, match=rf"GPU asked for, but this Ray instance has {gpus:g} GPU"
    ):
        plan_group(training_request(sc), {"CPU": 8.0, "GPU": gpus})


# -- an elastic group: scaling.num_workers [min, max] ----------------------------------------------
def test_on_a_cluster_an_elastic_group_waits_only_for_its_min(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    sc = replace(F30K_LIKE, num_workers=[1, 3])
    r = plan_group(training_request(sc), {"CPU": 4.0})
    assert fields(r) == (3, True, 6.0, 1.0, 6) and (r.least, r.fewest) == (1, 1)
    assert r.bundles() == "1 x {CPU: 6, GPU: 1}"  # what wait_for_room places
    assert r.ray_workers() == (1, 3)
    assert r.describe() == "1 to 3 worker(s) (elastic), each 1 GPU + 6 CPU, 6 torch thread(s)"


def test_locally_an_elastic_group_is_sized_for_its_max_within_the_machine(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cpu = plan_group(training_request(ScalingConfig(num_workers=[1, 2])), {"CPU": 2.0})
    assert fields(cpu) == (2, False, 0.5, 0.0, 1)  # grown to 2, a CPU is still Ray Data's
    assert cpu.ray_workers() == (1, 2)
    gpus = {"CPU": 16.0, "GPU": 2.0}
    r = plan_group(training_request(ScalingConfig(num_workers=[1, 4], use_gpu=True)), gpus)
    assert (r.count, r.least, r.ray_workers()) == (2, 1, (1, 2))  # as many as the GPUs hold
    with pytest.raises(ConfigError, match=r"3 x 1 GPU asked for, but this Ray instance has 2"):
        plan_group(training_request(ScalingConfig(num_workers=[3, 4], use_gpu=True)), gpus)


def test_a_fixed_group_stays_a_number_for_ray_train():
    r = size_group(training_request(ScalingConfig(num_workers=2)), {"CPU": 2.0})
    assert (r.least, r.elastic, r.ray_workers(), r.bundles()) == (None, False, 2, "2 x {CPU: 0.5}")


# -- the loopback switch --------------------------------------------------------------------------
KEY = next(iter(RAY_LOOPBACK))


def test_keep_ray_on_loopback_sets_the_variable_when_absent(monkeypatch):
    monkeypatch.setenv(KEY, "placeholder")  # recorded, so the test leaves os.environ as it was
    monkeypatch.delenv(KEY)
    keep_ray_on_loopback()
    assert os.environ[KEY] == RAY_LOOPBACK[KEY] == "0"


def test_keep_ray_on_loopback_keeps_a_value_already_set(monkeypatch):
    monkeypatch.setenv(KEY, "1")
    keep_ray_on_loopback()
    assert os.environ[KEY] == "1"


# -- Ray failures, shaped like ray.train's WorkerGroupError and ControllerError -------------------
class UserExceptionWithTraceback(Exception):
    """What ray.train wraps a worker's exception in: the original as ``_base_exc``."""

    def __init__(self, base: BaseException):
        super().__init__(f"Traceback (most recent call last):\n  ...\n{base!r}")
        self._base_exc = base


class WorkerGroupError(Exception):
    def __init__(self, failures: dict):
        super().__init__("Worker group failed\nsee the worker logs")
        self.worker_failures = failures


class ControllerError(Exception):
    def __init__(self, cause: BaseException):
        super().__init__("controller failed")
        self.controller_failure = cause


def test_worker_errors_unwrap_by_rank():
    data_error = DataError("train/part-0.parquet: not a readable Parquet file")
    plain = RuntimeError("CUDA out of memory\nmore details")
    e = WorkerGroupError({3: UserExceptionWithTraceback(data_error), 1: plain})
    assert worker_errors(e) == [(1, plain), (3, data_error)]  # sorted by rank, unwrapped


def test_a_base_exc_that_is_not_an_exception_keeps_the_wrapper():
    wrapper = UserExceptionWithTraceback(ValueError("x"))
    wrapper._base_exc = "not an exception"
    assert worker_errors(WorkerGroupError({0: wrapper})) == [(0, wrapper)]


def test_worker_errors_of_other_exceptions_are_empty():
    assert worker_errors(RuntimeError("boom")) == []
    e = RuntimeError("no failures")
    e.worker_failures = None
    assert worker_errors(e) == []


def test_failure_line_names_the_first_rank_and_the_first_line():
    e = WorkerGroupError(
        {
            2: UserExceptionWithTraceback(MemoryError("out of memory\nat step 3")),
            5: UserExceptionWithTraceback(ValueError("later")),
        }
    )
    assert failure_line(e) == "worker rank 2: MemoryError: out of memory"


def test_failure_line_of_an_error_without_message():
    e = WorkerGroupError({0: UserExceptionWithTraceback(KeyboardInterrupt())})
    assert failure_line(e) == "worker rank 0: KeyboardInterrupt"


def test_failure_line_of_a_controller_failure_uses_its_last_line():
    cause = RuntimeError("placement group timed out\nthe cluster has 2 CPUs, 4 requested")
    assert failure_line(ControllerError(cause)) == (
        "RuntimeError: the cluster has 2 CPUs, 4 requested"
    )


def test_failure_line_of_anything_else():
    assert failure_line(TimeoutError("first\n\nlast line\n")) == "TimeoutError: last line"
    assert failure_line(KeyError()) == "KeyError"
    e = ControllerError(cause=None)
    e.controller_failure = "not an exception"  # ignored: the error itself is described
    assert failure_line(e) == "ControllerError: controller failed"


# -- a thread Ray Data interrupts ends in its log, not on the console ---------------------------
class Records(logging.Handler):
    """The records ``shan.runtime`` logs; Ray Data's own (its usage thread's failed metrics
    query, say) come and go with timing and are left out."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.pathname == runtime.__file__:
            self.records.append(record)


def _end_thread_with(error: BaseException, in_ray: bool = False) -> None:
    """A thread ended by ``error``; ``in_ray``: its code as if in Ray's package (as Ray
    Train's ``PlacementGroupCleanerMonitor``)."""
    import ray

    where = os.path.join(os.path.dirname(ray.__file__), "fake.py") if in_ray else __file__
    space: dict = {"error": error}
    exec(compile("def run():\n    raise error\n", where, "exec"), space)
    t = threading.Thread(target=space["run"], name="ListFiles-0")
    t.start()
    t.join()


def test_rays_thread_errors_go_to_its_log_file_not_the_console(monkeypatch, capfd):
    import ray.data  # noqa: F401  (its logging set up, as in a job)

    # Python's own hook (pytest's would catch the thread's error), restored after the test
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    kept = Records()
    logging.getLogger("ray.data").addHandler(kept)
    try:
        quiet_threads()
        quiet_threads()  # once is enough: not wrapped twice
        _end_thread_with(InterruptedError())
        err = capfd.readouterr().err
        assert "Traceback" not in err and "InterruptedError" not in err
        (record,) = kept.records
        assert getattr(record, "hide", False) and "ListFiles-0" in record.getMessage()
        assert record.exc_info and record.exc_info[0] is InterruptedError
        _end_thread_with(RuntimeError("GCS unavailable"), in_ray=True)  # Ray's own thread
        err = capfd.readouterr().err
        assert "Traceback" not in err and "GCS unavailable" not in err
        assert "ended by RuntimeError" in kept.records[-1].getMessage()
        _end_thread_with(ValueError("a real failure"))  # anything else: printed as before
        err = capfd.readouterr().err
        assert "ValueError: a real failure" in err and "Traceback" in err
    finally:
        logging.getLogger("ray.data").removeHandler(kept)


def test_the_elastic_polls_print_their_decisions_only(monkeypatch):
    """Ray Train's elastic policy logs a line each resize interval, and a timed-out query of
    the autoscaling coordinator with its traceback; its controller logs a group start that
    timed out with its traceback: the no-change lines are dropped, a timeout is its one line,
    the decisions and other errors are kept (the hook runs in every worker process)."""
    from ray.exceptions import GetTimeoutError
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    policy, client, controller = (logging.getLogger(name) for name in runtime.ELASTIC_LOGGERS)
    seen: list[tuple[str, bool]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.getMessage(), record.exc_info is not None))

    keep = Keep()
    for logger in (policy, client, controller):
        monkeypatch.setattr(logger, "filters", [])
        logger.addHandler(keep)
    try:
        runtime.quiet_workers()
        runtime.quiet_workers()  # one filter each, not two
        policy.warning(
            "Did not detect any changes in the cluster resources. Training will continue with "
            "the same worker group size (2)."
        )
        policy.warning("Deciding to resize the worker group from 2 -> 1 workers.")
        for error in (GetTimeoutError("Get timed out"), RuntimeError("other")):
            try:
                raise error
            except Exception:
                client.warning("Failed to send resource request.", exc_info=True)
        for error in (WorkerGroupStartupTimeoutError(2), RuntimeError("other")):
            try:
                raise error
            except Exception:
                controller.exception("Error in control loop iteration: %s", type(error).__name__)
    finally:
        for logger in (policy, client, controller):
            logger.removeHandler(keep)
    assert seen == [
        ("Deciding to resize the worker group from 2 -> 1 workers.", False),
        ("Failed to send resource request.", False),  # the timeout: its line only
        ("Failed to send resource request.", True),  # any other error keeps its traceback
        ("Error in control loop iteration: WorkerGroupStartupTimeoutError", False),
        ("Error in control loop iteration: RuntimeError", True),
    ]
    assert len(policy.filters) == len(client.filters) == len(controller.filters) == 1
