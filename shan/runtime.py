"""Ray at run time: starting or joining it, sizing a group of workers or actors, and reading
what a failed worker left behind. One sizing rule serves training workers and evaluation
actors (:func:`size_group`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shan.config import ConfigError, ScalingConfig

# Ray replaces a node IP of 127.0.0.1 with the machine's routable address and then binds its
# GCS, raylet, object manager and agents to that address or to every interface. Its switch for
# single-node clusters (the default on macOS and Windows) keeps 127.0.0.1 as the node IP and
# binds everything to it; no other node can join such a head, which a local run never needs.
# It must be in the environment before a process imports Ray.
RAY_LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def keep_ray_on_loopback() -> None:
    """Make a Ray instance that this process starts later listen on 127.0.0.1 only.

    No effect on a process that has already imported Ray (its instance then listens where Ray's
    defaults say) or that connects to an existing cluster."""
    for k, v in RAY_LOOPBACK.items():
        os.environ.setdefault(k, v)


def init_ray(log: Callable[[str], None] = print) -> Any:
    """The ``ray`` module, connected to ``RAY_ADDRESS`` (a cluster, or a submitted job) or to a
    new local instance that listens on 127.0.0.1 only."""
    if not os.environ.get("RAY_ADDRESS"):
        keep_ray_on_loopback()
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        log(f"Ray: connecting to {address}" if address else "Ray: starting a local instance")
        # "local": always a new instance, never a stale cluster that `ray start` left recorded
        ray.init(address=address or "local", log_to_driver=True)
    return ray


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


@dataclass
class Resources:
    """A sized group: ``count`` members, each with ``cpus_each`` CPUs and ``gpus_each`` GPUs
    (0 on CPU), running ``torch_threads`` threads."""

    count: int
    use_gpu: bool
    cpus_each: float
    gpus_each: float
    torch_threads: int

    def describe(self, noun: str = "worker") -> str:
        kind = f"{self.gpus_each:g} GPU + " if self.use_gpu else ""
        return (
            f"{self.count} {noun}(s), each {kind}{self.cpus_each:g} CPU, "
            f"{self.torch_threads} torch thread(s)"
        )

    def ray_resources(self) -> dict[str, float]:
        """Ray's ``resources_per_worker`` / actor options for one member."""
        return {"CPU": self.cpus_each, **({"GPU": self.gpus_each} if self.use_gpu else {})}


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
    if use_gpu:
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
    return Resources(num, use_gpu, per_cpu, req.gpus_each if use_gpu else 0.0, threads)


def training_request(sc: ScalingConfig) -> GroupRequest:
    """The request of the ``scaling`` config section."""
    return GroupRequest(sc.num_workers, sc.use_gpu, sc.cpus_per_worker, sc.gpus_per_worker)


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
