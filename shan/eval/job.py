"""Evaluate trained models on a split: the whole similarity matrix on a pool of Ray actors,
the protocol's metrics, the outputs, and an MLflow run of its own."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from shan.checkpoint import MODEL_FILE, load_description, load_model
from shan.data import fs
from shan.data.format import load_card, load_vocab
from shan.data.reader import read_split
from shan.errors import CheckpointError, JobError
from shan.eval import outputs, refs, tiles
from shan.metrics import fold_metrics, format_table, recall_metrics

PROTOCOLS = ("plain", "f30k", "coco-1k", "coco-5k")


@dataclass
class EvalOptions:
    split: str = "test"
    protocol: str = "plain"
    tile_images: int = 256
    tile_captions: int = 1024
    actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    bf16: bool = True
    block: int | None = None
    fold_size: int = 1000
    experiment: str = "shan-eval"
    log_matrices_mb: float = 256.0  # larger sims_*.npy stay in --out, not in MLflow
    on_tile: Callable[[int], None] | None = None  # test hook
    tags: dict = field(default_factory=dict)


def check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise JobError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def protocol_images(protocol: str, n: int, fold_size: int) -> int:
    """How many images (the first ones of the split) the protocol scores."""
    need = {"plain": 0, "f30k": fold_size, "coco-1k": 5 * fold_size, "coco-5k": 5 * fold_size}
    if n < need[protocol]:
        raise JobError(f"protocol {protocol} needs {need[protocol]} images, the split has {n}")
    return n if protocol == "plain" else need[protocol]


def protocol_metrics(protocol: str, sims, caption_image, fold_size: int) -> dict[str, dict]:
    if protocol == "coco-1k":
        return {k: fold_metrics(v, caption_image, 5, fold_size) for k, v in sims.items()}
    return {k: recall_metrics(v, caption_image) for k, v in sims.items()}


def check_fit(ref: refs.ModelRef, root: str, card, vocab) -> None:
    cfg, ck_vocab = load_description(ref.path)
    if ck_vocab != vocab:
        raise CheckpointError(
            f"model {ref.ref}: its vocabulary ({len(ck_vocab)} words) is not the data set's "
            f"({root}, {len(vocab)} words)"
        )
    if cfg.model.feature_dim != card.feature_dim:
        raise CheckpointError(
            f"model {ref.ref}: it takes {cfg.model.feature_dim}-d features, the data set "
            f"{root} has {card.feature_dim}-d"
        )


def actor_resources(opts: EvalOptions, cluster: dict) -> tuple[int, float, float, int]:
    """(actors, CPUs each, GPUs each, torch threads each), sized to the cluster."""
    cpus, gpus = float(cluster.get("CPU", 1)), float(cluster.get("GPU", 0))
    per_gpu = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    n = opts.actors or (max(1, int(gpus // per_gpu)) if per_gpu else max(1, int(cpus // 2)))
    per_cpu = opts.cpus_per_actor or round(max(0.25, min(8.0, cpus / n)), 2)
    return n, per_cpu, per_gpu, max(1, int(round(cpus / n)) if not per_gpu else int(per_cpu))


def evaluate(
    model_refs: list[str], data: str, out: str, opts: EvalOptions | None = None, log=print
) -> dict:
    """Evaluate ``model_refs`` (several: an ensemble, matrices averaged) on ``data``."""
    opts = opts or EvalOptions()
    check_protocol(opts.protocol)
    card, vocab = load_card(data), load_vocab(data)
    if opts.split not in card.splits:
        raise JobError(f"data set {data} has no split {opts.split!r} (it has {list(card.splits)})")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    models = [refs.resolve(r, uri) for r in model_refs]
    for m in models:
        check_fit(m, data, card, vocab)
    split = read_split(data, opts.split, card)
    n = protocol_images(opts.protocol, len(split.image_ids), opts.fold_size)
    if n < len(split.image_ids):
        split = split.head(n)
    log(
        f"evaluating {len(models)} model(s) on {data} [{opts.split}], protocol {opts.protocol}: "
        f"{n} images x {len(split.captions)} captions"
    )
    t0 = time.perf_counter()
    sims = _matrices(models, data, split, out, opts, log)
    seconds = time.perf_counter() - t0
    metrics = protocol_metrics(opts.protocol, sims, split.caption_image, opts.fold_size)
    result = _write(models, data, split, out, opts, sims, metrics, seconds, vocab)
    log(result["table"])
    return result


def _matrices(models, data, split, out, opts, log) -> dict[str, np.ndarray]:
    import ray

    from shan.train.driver import init_ray

    init_ray(log)
    n_act, cpus, gpus, threads = actor_resources(opts, ray.cluster_resources())
    log(f"scoring on {n_act} actor(s), each {cpus:g} CPU" + (f" + {gpus:g} GPU" if gpus else ""))
    files = [
        {p.name: p.read_bytes() for p in Path(m.path).iterdir() if p.is_file()} for m in models
    ]
    pool = tiles.start_pool(files, n_act, cpus, gpus, threads, opts.bf16, opts.block)
    order = np.argsort([len(t) for t in split.tokens], kind="stable").tolist()
    total = None
    try:
        for i in range(len(models)):
            fp = tiles.fingerprint(
                files[i][MODEL_FILE], data, opts.split, opts.protocol, str(len(split.captions))
            )
            plan = tiles.Plan(
                len(split.image_ids),
                len(split.captions),
                opts.tile_images,
                opts.tile_captions,
                order,
                fp,
            )
            store = tiles.TileStore(fs.join(out, "tiles", f"model-{i}"), plan)
            sims = tiles.compute(
                pool,
                plan,
                store,
                split.features,
                split.num_regions,
                split.tokens,
                model_index=i,
                on_tile=opts.on_tile,
            )
            total = sims if total is None else {k: total[k] + sims[k] for k in sims}
    finally:
        for a in pool.actors:
            ray.kill(a)
    return {k: v / len(models) for k, v in total.items()}


def _write(models, data, split, out, opts, sims, metrics, seconds, vocab) -> dict:
    refs_txt = ", ".join(m.ref for m in models)
    header = (
        f"# Recall on {Path(data).name} [{opts.split}], protocol {opts.protocol}\n\n"
        f"model: {refs_txt}; {len(split.image_ids)} images x {len(split.captions)} "
        "captions; recalls in percent (pessimistic ties)"
    )
    index = {
        "image_ids": split.image_ids.tolist(),
        "caption_image_ids": split.image_ids[split.caption_image].tolist(),
    }
    extra = {
        "recall_at_k.png": outputs.plot_recall(
            outputs.recall_curves(sims, split.caption_image), f"{refs_txt} on {opts.split}"
        )
    }
    model = load_model(models[0].path)[0]
    extra.update(
        outputs.attention_pictures(
            model, vocab, split, np.arange(len(split.image_ids)), sims["total"], split.caption_image
        )
    )
    meta = {
        "model": [m.ref for m in models],
        "data": data,
        "split": opts.split,
        "protocol": opts.protocol,
        "images": len(split.image_ids),
        "captions": len(split.captions),
        "seconds": seconds,
    }
    doc = {**metrics, "meta": meta}
    table = format_table(metrics)
    names = outputs.write_outputs(out, sims, index, doc, extra, f"{header}\n\n{table}\n")
    return {
        "metrics": metrics,
        "table": table,
        "names": names,
        "doc": doc,
        "models": models,
    }
