"""Images in, region features out: Ray Data reads and decodes the images in tasks and feeds
an actor pool (one actor per GPU, or fractional CPUs) that runs the extractor.

Each output batch: ``index`` (B,), ``uri``, ``size`` (B, 2) original width and height,
``error`` (B,) ("" when fine), ``features`` (B, R, 2048) float32, ``boxes`` (B, R, 4),
``num_regions`` (B,). Rows with an error have zero features and no regions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from shan.features import ExtractorSpec
from shan.features.decode import decode_batch


class ExtractActor:
    """Builds the extractor once, then turns decoded batches into features."""

    def __init__(self, spec: ExtractorSpec, threads: int = 0) -> None:
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.spec, self.extractor = spec, spec.build()

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        ok = np.array([e == "" for e in batch["error"]], dtype=bool)
        B, R, F = len(ok), self.spec.num_regions, self.extractor.feature_dim
        feats = np.zeros((B, R, F), np.float32)
        boxes = np.zeros((B, R, 4), np.float32)
        counts = np.zeros(B, np.int32)
        if ok.any():
            f, b, c = self.extractor(batch["pixels"][ok], batch["size"][ok], batch["scaled"][ok])
            feats[ok], boxes[ok], counts[ok] = f, b, c
        out = {k: batch[k] for k in ("index", "uri", "size", "error")}
        return {**out, "features": feats, "boxes": boxes, "num_regions": counts}


@dataclass
class Resources:
    actors: int
    cpus: float  # per actor
    gpus: float  # per actor
    threads: int  # torch threads per actor


def plan_resources(
    cluster: dict[str, float],
    actors: int | None = None,
    cpus: float | None = None,
    gpus: float | None = None,
) -> Resources:
    """One actor per GPU when there are GPUs; else CPU actors that together leave one CPU to
    Ray Data's read and decode tasks (whole-CPU actors on a 2-CPU machine starve them)."""
    n_cpu, n_gpu = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    per_gpu = gpus if gpus is not None else (1.0 if n_gpu else 0.0)
    n = actors or (max(1, int(n_gpu // per_gpu)) if per_gpu else max(1, int(n_cpu // 4)))
    spare = max(n_cpu - 1, 0.5)
    per_cpu = cpus or round(max(0.25, min(4.0, spare / n)), 2)
    threads = max(1, int(round(n_cpu / n))) if not per_gpu else max(1, int(per_cpu))
    return Resources(n, per_cpu, per_gpu, threads)


def run_local(
    items: list[dict[str, Any]], spec: ExtractorSpec, batch_size: int, min_side: int
) -> Iterator[dict[str, Any]]:
    """The same steps in this process, without Ray (small sets, trials, tests)."""
    actor = ExtractActor(spec)
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = {"index": [r["index"] for r in chunk], "uri": [r["uri"] for r in chunk]}
        yield actor(decode_batch(batch, spec.size, spec.letterbox, min_side))


def run_ray(
    items: list[dict[str, Any]], spec: ExtractorSpec, res: Resources, batch_size: int, min_side: int
) -> Iterator[dict[str, Any]]:
    """Ray Data: read + decode tasks, then the extractor's actor pool; batches in order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False  # the job prints its own
    blocks = max(1, min(len(items) // batch_size, 256))
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        decode_batch,  # type: ignore[arg-type]  # ray's stub leaves out fn_kwargs' arguments
        fn_kwargs={"size": spec.size, "letterbox": spec.letterbox, "min_side": min_side},
        batch_size=batch_size,
        num_cpus=0.5,
    )
    ds = ds.map_batches(
        ExtractActor,
        fn_constructor_kwargs={"spec": spec, "threads": res.threads},
        compute=ray.data.ActorPoolStrategy(size=res.actors),
        num_cpus=res.cpus,
        num_gpus=res.gpus,
        batch_size=batch_size,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
