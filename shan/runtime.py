"""Ray at run time: starting or joining it, sizing a group of workers or actors, waiting for
the cluster to offer it, and reading what a failed worker left behind.

One rule serves training workers, evaluation actors and extraction actors
(:func:`plan_group`): on a cluster (``RAY_ADDRESS`` set, as in a submitted job) a group is
asked for exactly as configured and the job waits for the autoscaler (:func:`wait_for_room`);
a local instance is sized from what it has (:func:`size_group`). An elastic group (a range
``[min, max]`` of members) waits on a cluster only for ``min`` to fit, and is sized locally for
as many as the machine holds up to ``max``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from shan.config import ConfigError, ScalingConfig
from shan.errors import JobError

# Ray replaces a node IP of 127.0.0.1 with the machine's routable address and then binds its
# GCS, raylet, object manager and agents to that address or to every interface. Its switch for
# single-node clusters (the default on macOS and Windows) keeps 127.0.0.1 as the node IP and
# binds everything to it; no other node can join such a head, which a local run never needs.
# It must be in the environment before a process imports Ray.
RAY_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def on_cluster() -> bool:
    """Whether a job joins a cluster (``RAY_ADDRESS`` set: by the user, or by Ray for a
    submitted job) rather than starting a local instance of its own (no ``RAY_ADDRESS``, or
    ``local``)."""
    return os.environ.get("RAY_ADDRESS", "").strip() not in ("", "local")


def keep_ray_on_loopback() -> None:
    """Make a Ray instance that this process starts later listen on 127.0.0.1 only.

    No effect on a process that has already imported Ray (its instance then listens where Ray's
    defaults say) or that connects to an existing cluster."""
    for k, v in RAY_LOOPBACK.items():
        os.environ.setdefault(k, v)


def init_ray(log: Callable[[str], None] = print) -> Any:
    """The ``ray`` module, connected to ``RAY_ADDRESS`` (a cluster, or a submitted job) or to a
    new local instance that listens on 127.0.0.1 only."""
    if not on_cluster():
        keep_ray_on_loopback()
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") if on_cluster() else None
        log(f"Ray: connecting to {address}" if address else "Ray: starting a local instance")
        # "local": always a new instance, never a stale cluster that `ray start` left recorded
        ray.init(
            address=address or "local",
            log_to_driver=True,
            runtime_env={"worker_process_setup_hook": f"{__name__}.{quiet_workers.__name__}"},
        )
    quiet_workers()
    return ray


# Ray Train's elastic policy logs this at INFO each scaling.resize_interval seconds when the
# group keeps its size: a line a minute that says nothing happened
ELASTIC_UNCHANGED = "Did not detect any changes in the cluster resources"
# its loggers; on a loaded machine they also log each timed-out query of Ray's autoscaling
# coordinator (retried at the next poll) as a warning with the timeout's traceback
ELASTIC_LOGGERS = (
    *(
        f"ray.train.v2._internal.execution.scaling_policy.{name}"
        for name in ("elastic", "autoscaling_coordinator_client")
    ),
    # the controller logs a group start that timed out (after a node loss, while Ray still
    # counts the dead node) with its traceback, then retries with what fits: one line is enough
    "ray.train.v2._internal.execution.controller.controller",
)


class _ElasticPolls(logging.Filter):
    """Drops the elastic policy's no-change line; keeps a timed-out query's warning, and the
    controller's line for a group start that timed out, as one line without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(ELASTIC_UNCHANGED):
            return False
        from ray.exceptions import GetTimeoutError
        from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

        timeouts = (GetTimeoutError, WorkerGroupStartupTimeoutError)
        if record.exc_info and isinstance(record.exc_info[1], timeouts):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_workers() -> None:
    """The job's ``worker_process_setup_hook`` (run in the driver too): :func:`quiet_threads`,
    and Ray Train's elastic polls (:class:`_ElasticPolls`) quieter on the console; its
    decisions to start, shrink or grow a group are still printed."""
    quiet_threads()
    for name in ELASTIC_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ElasticPolls) for f in logger.filters):
            logger.addFilter(_ElasticPolls())


def quiet_threads() -> None:
    """Route the errors that end Ray's own threads to Ray's log files, not the console.

    On a loaded machine a run that went well printed tracebacks of Ray's threads: an
    ``InterruptedError`` in a Ray Data ``ListFiles`` thread (Ray Data stops its threads by
    interrupting them), an ``RpcError`` in Ray Train's ``PlacementGroupCleanerMonitor``. This
    process's :data:`threading.excepthook` logs a thread's end by an ``InterruptedError``, or
    any error of a thread whose code is Ray's, to the ``ray.data`` logger marked hidden
    (``ray-data.log`` in the session's logs, not the console); any other thread's error is
    printed as before. Run in the driver and, as Ray's ``worker_process_setup_hook``, in each
    of the job's Ray workers."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "quiet_threads", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is not None and (
            issubclass(args.exc_type, InterruptedError) or _rays_thread(args.exc_traceback)
        ):
            import ray.data  # noqa: F401  (configures the "ray.data" logger and its file)

            name = args.thread.name if args.thread is not None else "?"
            logging.getLogger("ray.data").warning(
                "Ray's thread %s ended by %s",
                name,
                args.exc_type.__name__,
                exc_info=args.exc_value,
                extra={"hide": True},  # Ray Data's console filter drops it; its file keeps it
            )
            return
        previous(args)

    hook.quiet_threads = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _rays_thread(tb: TracebackType | None) -> bool:
    """Whether the thread of traceback ``tb`` runs Ray's code: its first frame past
    :mod:`threading` is in Ray's package."""
    import threading

    import ray

    package = os.path.dirname(ray.__file__) + os.sep
    while tb is not None and tb.tb_frame.f_code.co_filename == threading.__file__:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.startswith(package)


@dataclass
class GroupRequest:
    """What a config asks of a group of Ray workers or actors; None: size it from the cluster.

    ``cpus_per_member_guess``: CPUs per member when the count is guessed on a CPU-only cluster
    (training workers and extraction actors 4, evaluation actors 2); ``max_cpus_each`` caps a
    guessed share. ``reserve_for_data``: leave a CPU to Ray Data's tasks (a job that reads with
    Ray Data while the group runs). ``check_fit``: refuse a request larger than the cluster is
    now (off where the group may wait for Ray to find room)."""

    count: int | None = None
    use_gpu: bool | None = None
    cpus_each: float | None = None
    gpus_each: float = 1.0
    cpus_per_member_guess: int = 4
    max_cpus_each: float = 8.0
    reserve_for_data: bool = True
    check_fit: bool = True
    what: str = "scaling.num_workers x scaling.cpus_per_worker"
    gpu_off: str = "scaling.use_gpu=false, without --gpus-per-worker"
    least: int | None = None  # an elastic group: at least this many, at most ``count``


@dataclass
class Resources:
    """A sized group: ``count`` members, each with ``cpus_each`` CPUs and ``gpus_each`` GPUs
    (0 on CPU), running ``torch_threads`` threads."""

    count: int
    use_gpu: bool
    cpus_each: float
    gpus_each: float
    torch_threads: int
    least: int | None = None  # an elastic group: ``least`` to ``count`` members

    @property
    def elastic(self) -> bool:
        return self.least is not None

    @property
    def fewest(self) -> int:
        """The members the group cannot start without: ``least``, else ``count``."""
        return self.count if self.least is None else self.least

    def describe(self, noun: str = "worker") -> str:
        kind = f"{self.gpus_each:g} GPU + " if self.use_gpu else ""
        count = f"{self.least} to {self.count}" if self.elastic else str(self.count)
        return (
            f"{count} {noun}(s){' (elastic)' if self.elastic else ''}, each {kind}"
            f"{self.cpus_each:g} CPU, {self.torch_threads} torch thread(s)"
        )

    def ray_workers(self) -> int | tuple[int, int]:
        """Ray Train's ``num_workers``: the count, or ``(min, max)`` for an elastic group."""
        return (self.fewest, self.count) if self.elastic else self.count

    def ray_resources(self) -> dict[str, float]:
        """Ray's ``resources_per_worker`` / actor options for one member."""
        return {"CPU": self.cpus_each, **({"GPU": self.gpus_each} if self.use_gpu else {})}

    def bundles(self) -> str:
        """``2 x {CPU: 4, GPU: 1}``: what the group cannot start without (an elastic group:
        its ``least``)."""
        each = ", ".join(f"{k}: {v:g}" for k, v in self.ray_resources().items())
        return f"{self.fewest} x {{{each}}}"


def plan_group(req: GroupRequest, cluster: dict[str, float] | None = None) -> Resources:
    """The group for ``req``: asked as configured on a cluster (:func:`ask_group`), sized from
    ``cluster`` (``ray.cluster_resources()`` of a local instance) otherwise."""
    if on_cluster() or cluster is None:
        return ask_group(req)
    return size_group(req, cluster)


def ask_group(req: GroupRequest) -> Resources:
    """Exactly what ``req`` asks, never guessed from the nodes that happen to be up (on an
    autoscaling cluster the GPU nodes may not exist yet). Unset fields take Ray's defaults:
    one member, no GPU, one CPU each; torch threads: the CPUs asked for."""
    use_gpu = bool(req.use_gpu)
    cpus = round(req.cpus_each or 1.0, 2)
    gpus = req.gpus_each if use_gpu else 0.0
    return Resources(req.count or 1, use_gpu, cpus, gpus, max(1, int(cpus)), least=req.least)


def cluster_offer(ray: Any) -> str:
    """``CPU 2/4, GPU 0/0 free on 3 node(s)``: what the cluster has now."""
    total, free = ray.cluster_resources(), ray.available_resources()
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    parts = [f"{k} {free.get(k, 0):g}/{total.get(k, 0):g}" for k in ("CPU", "GPU")]
    return f"{', '.join(parts)} free on {nodes} node(s)"


def wait_for_room(
    res: Resources,
    timeout: float,
    *,
    noun: str = "worker",
    strategy: str = "PACK",
    log: Callable[[str], None] = print,
    every: float = 30.0,
) -> float:
    """Wait until the cluster can place ``res`` (a placement group of its bundles, which an
    autoscaler sees as demand and adds nodes for), then release it for the group to take;
    returns the seconds waited. A JobError naming the resources after ``timeout`` seconds."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    start = time.monotonic()
    pg = placement_group([res.ray_resources()] * res.fewest, strategy=strategy)
    placed = pg.ready()
    try:
        ready, _ = ray.wait([placed], timeout=min(2.0, timeout))
        if ready:
            return time.monotonic() - start
        log(
            f"waiting for the cluster to offer {res.bundles()} for {res.fewest} {noun}(s) "
            f"({cluster_offer(ray)} now); --wait-timeout {timeout:g} s"
        )
        while not ready:
            waited = time.monotonic() - start
            if waited >= timeout:
                raise JobError(
                    f"the cluster did not offer {res.bundles()} for {res.fewest} {noun}(s) within "
                    f"--wait-timeout {timeout:g} s ({cluster_offer(ray)}): add nodes, or ask "
                    "for less"
                )
            ready, _ = ray.wait([placed], timeout=min(every, timeout - waited))
            if not ready:
                log(f"still waiting ({waited + min(every, timeout - waited):.0f} s): "
                    f"{cluster_offer(ray)}")  # fmt: skip
        waited = time.monotonic() - start
        log(f"the cluster offered {res.bundles()} after {waited:.0f} s")
        return waited
    finally:
        with contextlib.suppress(Exception):  # Ray gone: the error that brought us here counts
            remove_placement_group(pg)


def size_group(req: GroupRequest, cluster: dict[str, float]) -> Resources:
    """Fill in what ``req`` leaves as None from ``cluster`` (``ray.cluster_resources()``).

    GPU: one member per ``gpus_each`` GPUs. CPU only: one member per ``cpus_per_member_guess``
    CPUs (at least 1). With ``reserve_for_data``, at least one CPU, or half of one on the
    smallest machines, is left to Ray Data's tasks: whole-CPU members on 2 CPUs would starve
    them and the job would hang. Torch threads: the CPUs asked for (at least 1), or, when the
    share was guessed on a CPU-only cluster, the cluster's CPUs over the members.
    """
    cpus = float(cluster.get("CPU", 1))
    gpus = float(cluster.get("GPU", 0))
    use_gpu = bool(req.use_gpu if req.use_gpu is not None else gpus >= 1)
    fewest = req.least or req.count or 1
    if use_gpu and gpus < req.gpus_each * fewest:
        raise ConfigError(
            f"{fewest} x {req.gpus_each:g} GPU asked for, but this Ray instance has "
            f"{gpus:g} GPU: ask for none ({req.gpu_off}), or run against a cluster with "
            "RAY_ADDRESS"
        )
    if use_gpu and req.least is not None and req.count is not None:  # as many as fit
        num = max(req.least, min(req.count, int(gpus // req.gpus_each)))
    elif use_gpu:
        num = req.count or max(1, int(gpus // req.gpus_each))
    else:
        num = req.count or max(1, int(cpus // req.cpus_per_member_guess))
    spare = (1.0 if cpus >= 2 else 0.5) if req.reserve_for_data else 0.0
    per_cpu = round(req.cpus_each or max(0.25, min(req.max_cpus_each, (cpus - spare) / num)), 2)
    if req.check_fit and per_cpu * num > cpus:
        raise ConfigError(
            f"{req.what} ({num} x {per_cpu:g} CPU) exceed the cluster's {cpus:g} CPUs: lower "
            "one of them"
        )
    if use_gpu or req.cpus_each:  # CPUs asked for: that many threads, never more
        threads = max(1, int(per_cpu))
    else:  # guessed on a CPU-only cluster: the members share every CPU's thread
        threads = max(1, int(cpus // num))
    gpus_each = req.gpus_each if use_gpu else 0.0
    return Resources(num, use_gpu, per_cpu, gpus_each, threads, least=req.least)


def training_request(sc: ScalingConfig) -> GroupRequest:
    """The request of the ``scaling`` config section; a range ``[min, max]`` of workers is an
    elastic request of at least ``min`` and at most ``max``."""
    span = sc.worker_range()
    count, least = (span[1] if span else None), (span[0] if span and sc.elastic else None)
    return GroupRequest(count, sc.use_gpu, sc.cpus_per_worker, sc.gpus_per_worker, least=least)


def worker_errors(e: BaseException) -> list[tuple[int, BaseException]]:
    """(rank, exception) of each worker of a Ray Train ``WorkerGroupError``, by type: Ray
    hands the worker's own exception back, wrapped with its traceback text."""
    failures = getattr(e, "worker_failures", None) or {}
    out = []
    for rank, error in sorted(failures.items()):
        base = getattr(error, "_base_exc", None)  # ray.train's UserExceptionWithTraceback
        out.append((rank, base if isinstance(base, BaseException) else error))
    return out


def failure_line(e: BaseException) -> str:
    """One line for a Ray failure that is not a user error: the first failed worker's rank,
    error type and message (or the controller's error, or the exception's last line)."""
    errors = worker_errors(e)
    if errors:
        rank, error = errors[0]
        text = str(error).strip().splitlines()
        return f"worker rank {rank}: {type(error).__name__}" + (f": {text[0]}" if text else "")
    cause = getattr(e, "controller_failure", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}" + (f": {text[-1]}" if text else "")
