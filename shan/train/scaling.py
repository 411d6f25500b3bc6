"""Worker count and resources, sized from the cluster unless the config says otherwise."""

from __future__ import annotations

from dataclasses import dataclass

from shan.config import ConfigError, ScalingConfig


@dataclass
class Resources:
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    gpus_per_worker: float
    torch_threads: int

    def describe(self) -> str:
        kind = f"{self.gpus_per_worker:g} GPU + " if self.use_gpu else ""
        return (
            f"{self.num_workers} worker(s), each {kind}{self.cpus_per_worker:g} CPU, "
            f"{self.torch_threads} torch thread(s)"
        )


def resolve(sc: ScalingConfig, cluster: dict[str, float]) -> Resources:
    """Fill in what ``sc`` leaves as None from ``ray.cluster_resources()``.

    CPU-only: one worker per 4 CPUs (at least 1), leaving at least one CPU, or half of one on
    the smallest machines, to Ray Data's read tasks: whole-CPU workers on 2 CPUs would starve
    them and the job would hang.
    """
    cpus = float(cluster.get("CPU", 1))
    gpus = float(cluster.get("GPU", 0))
    use_gpu = sc.use_gpu if sc.use_gpu is not None else gpus >= 1
    if use_gpu:
        num = sc.num_workers or max(1, int(gpus // sc.gpus_per_worker))
    else:
        num = sc.num_workers or max(1, int(cpus // 4))
    spare = 1.0 if cpus >= 2 else 0.5
    per_cpu = sc.cpus_per_worker or max(0.25, min(8.0, (cpus - spare) / num))
    per_cpu = round(per_cpu, 2)
    if per_cpu * num > cpus:
        raise ConfigError(
            f"scaling.num_workers x scaling.cpus_per_worker ({num} x {per_cpu:g} CPU) exceed "
            f"the cluster's {cpus:g} CPUs: lower one of them"
        )
    threads = max(1, int(cpus // num)) if not use_gpu else max(1, int(per_cpu))
    return Resources(num, bool(use_gpu), per_cpu, sc.gpus_per_worker if use_gpu else 0.0, threads)
