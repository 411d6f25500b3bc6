"""Images in, region features out: Ray Data reads and decodes the images in tasks and feeds
an actor pool (one actor per GPU, or fractional CPUs) that runs the extractor.

Each output batch: ``index`` (B,), ``uri``, ``size`` (B, 2) original width and height,
``error`` (B,) ("" when fine), ``features`` (B, R, 2048) float32, ``boxes`` (B, R, 4),
``num_regions`` (B,). Rows with an error have zero features and no regions.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from shan.features import ExtractorSpec
from shan.features.decode import decode_batch
from shan.runtime import GroupRequest, Resources, plan_group


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


def plan_resources(
    cluster: dict[str, float],
    actors: int | None = None,
    cpus: float | None = None,
    gpus: float | None = None,
) -> Resources:
    """The extraction actors, by the one rule (:func:`shan.runtime.plan_group`): on a cluster
    as asked (Ray Data's pool waits for them); locally one actor per GPU when there are GPUs,
    else CPU actors (at most 4 CPUs each) that together leave a CPU to Ray Data's read and
    decode tasks."""
    request = GroupRequest(
        count=actors,
        use_gpu=None if gpus is None else gpus > 0,
        cpus_each=cpus,
        gpus_each=gpus or 1.0,
        max_cpus_each=4.0,
        check_fit=False,  # Ray Data's pool waits for room
        what="--actors x --cpus-per-actor",
        gpu_off="--gpus-per-actor 0",
    )
    return plan_group(request, cluster)


def run_local(
    items: list[dict[str, Any]], spec: ExtractorSpec, batch_size: int, min_side: int
) -> Iterator[dict[str, Any]]:
    """The same steps in this process, without Ray (small sets, trials, tests); the extractor
    is built once the first batch has decoded (a bad image stops the job before that)."""
    actor = None
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = {"index": [r["index"] for r in chunk], "uri": [r["uri"] for r in chunk]}
        decoded = decode_batch(batch, spec.size, spec.letterbox, min_side)
        actor = actor or ExtractActor(spec)
        yield actor(decoded)


def run_ray(
    items: list[dict[str, Any]], spec: ExtractorSpec, res: Resources, batch_size: int, min_side: int
) -> Iterator[dict[str, Any]]:
    """Ray Data: read + decode tasks, then the extractor's actor pool; batches in order."""
    import ray.data

    from shan.progress import quiet_ray_data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    quiet_ray_data(ctx, own_progress=True)  # the job reports the images done itself
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
        fn_constructor_kwargs={"spec": spec, "threads": res.torch_threads},
        compute=ray.data.ActorPoolStrategy(size=res.count),
        num_cpus=res.cpus_each,
        num_gpus=res.gpus_each,
        batch_size=batch_size,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
