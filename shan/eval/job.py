"""Evaluate trained models on a split: the whole similarity matrix on a pool of Ray actors,
the protocol's metrics, the outputs, and an MLflow run of its own.

Everything a user can get wrong is checked before any Ray actor starts: the options, the output
location (only an evaluation's own files, and no other evaluation writing there: a lock), the
data set, and every checkpoint (loaded in full: weights, config, vocabulary, finite weights).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shan.checkpoint import load_checked
from shan.config import Checked, Problems
from shan.data import fs
from shan.data.format import CARD, DatasetCard, load_card, load_vocab
from shan.data.reader import SplitArrays, read_split
from shan.errors import JobError
from shan.eval import PROTOCOLS, outputs, tiles
from shan.eval.lock import OutLock
from shan.fingerprint import data_fingerprint, digest
from shan.metrics import fold_metrics, format_table, recall_metrics
from shan.pictures import attention_pictures
from shan.runtime import GroupRequest, Resources, init_ray, on_cluster, plan_group, wait_for_room
from shan.tracking import refs
from shan.vocab import Vocabulary

if TYPE_CHECKING:  # torch is imported once a checkpoint is loaded
    from shan.checkpoint import Checkpoint
    from shan.model import SHAN


@dataclass
class EvalOptions(Checked):
    """The evaluation's options; :meth:`check` raises every problem at once (the command line
    range-checks its flags itself: these checks serve callers of :func:`evaluate`)."""

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
    wait_timeout_s: float = 1800.0  # on a cluster: how long to wait for room for the actors
    tags: dict = field(default_factory=dict)

    def problems(self) -> list[str]:
        """What is wrong with the options, one line each, named as the fields."""
        p = Problems()
        if self.protocol not in PROTOCOLS:
            p.append(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        for name in ("tile_images", "tile_captions", "fold_size"):
            p.at_least(name, getattr(self, name), 1)
        p.at_least("actors", self.actors, 1, optional=True)
        p.at_least("block", self.block, 1, optional=True)
        p.positive("cpus_per_actor", self.cpus_per_actor, optional=True)
        g = self.gpus_per_actor
        if g is not None and not (
            isinstance(g, int | float) and 0 <= g < math.inf and (g <= 1 or float(g).is_integer())
        ):
            p.bad("gpus_per_actor", g, ">= 0, and whole above 1")
        p.positive("wait_timeout_s", self.wait_timeout_s)
        p.non_negative("log_matrices_mb", self.log_matrices_mb)
        return list(p)


def protocol_images(protocol: str, n: int, fold_size: int) -> int:
    """How many images (the first ones of the split) the protocol scores."""
    need = {"plain": 0, "f30k": fold_size, "coco-1k": 5 * fold_size, "coco-5k": 5 * fold_size}
    if n < need[protocol]:
        raise JobError(f"protocol {protocol} needs {need[protocol]} images, the split has {n}")
    return n if protocol == "plain" else need[protocol]


def protocol_metrics(
    protocol: str, sims: dict[str, np.ndarray], caption_image: np.ndarray, fold_size: int
) -> dict[str, dict[str, float]]:
    if protocol == "coco-1k":
        return {k: fold_metrics(v, caption_image, 5, fold_size) for k, v in sims.items()}
    return {k: recall_metrics(v, caption_image) for k, v in sims.items()}


@dataclass
class EvalModel:
    """A resolved reference, loaded and checked on the driver: its weights-only checkpoint (for
    the actors), the checkpoint files' sha256 digests (for the fingerprint) and the model."""

    ref: refs.ModelRef
    weights: Checkpoint  # weights only: the optimizer's state never reaches the actors
    files: dict[str, str]  # file name -> sha256 of its bytes
    model: SHAN


@dataclass
class EvalResult:
    """What an evaluation returns: the protocol's metrics (``{"total": {...}, "l2l": ...}``),
    their table, the names of the files written in ``--out``, ``metrics.json``'s document,
    and the models' references."""

    metrics: dict[str, dict[str, float]]
    table: str
    names: list[str]
    doc: dict
    models: list[refs.ModelRef]
    card: DatasetCard | None = None  # the evaluated data set's card

    @property
    def rsum(self) -> float:
        return float(self.metrics["total"]["rsum"])


@dataclass
class _Job:
    """One evaluation's inputs, once checked."""

    models: list[EvalModel]
    data: str
    split: SplitArrays
    out: str
    opts: EvalOptions
    vocab: Vocabulary


def load_eval_model(
    ref: refs.ModelRef, data: str, card: DatasetCard, vocab: Vocabulary
) -> EvalModel:
    """``ref``'s checkpoint loaded in full and checked against the data set
    (:func:`shan.checkpoint.load_checked`): CheckpointError naming the file otherwise."""
    checked = load_checked(ref.path, card, vocab, name=ref.ref, data=data)
    return EvalModel(ref, checked.checkpoint, checked.files, checked.model)


def tile_fingerprint(
    data_fp: str, files: dict[str, str], job: _Job, device: tuple[str, str]
) -> str:
    """What a model's tiles depend on: the data, every file of the checkpoint (weights,
    config.yaml, vocab.json), split, protocol, matrix size, device kind and effective
    precision (``device``), tile sizes and score block. Tiles of another fingerprint are
    recomputed, never reused."""
    opts, split, (kind, precision) = job.opts, job.split, device
    return digest(
        "data",
        data_fp,
        "checkpoint",
        *[x for name, b in sorted(files.items()) for x in (name, b)],
        "split",
        opts.split,
        "protocol",
        opts.protocol,
        "matrix",
        f"{len(split.image_ids)}x{len(split.captions)}",
        "precision",
        precision,
        "device",
        kind,
        "tiles",
        f"{opts.tile_images}x{opts.tile_captions}",
        "block",
        str(opts.block),
    )


def actor_request(opts: EvalOptions) -> GroupRequest:
    """The evaluation actors' request (the same sizing rule as training workers')."""
    use_gpu = None if opts.gpus_per_actor is None else opts.gpus_per_actor > 0
    return GroupRequest(
        count=opts.actors,
        use_gpu=use_gpu,
        cpus_each=opts.cpus_per_actor,
        gpus_each=opts.gpus_per_actor or 1.0,
        cpus_per_member_guess=2,
        reserve_for_data=False,  # the actors read nothing through Ray Data
        check_fit=False,  # actors wait for room; --wait-timeout ends the wait
        what="--actors x --cpus-per-actor",
        gpu_off="--gpus-per-actor 0",
    )


def evaluate(
    model_refs: list[str],
    data: str,
    out: str,
    opts: EvalOptions | None = None,
    log: Callable[[str], None] = print,
) -> EvalResult:
    """Evaluate ``model_refs`` (several: an ensemble, matrices averaged) on ``data``."""
    opts = opts or EvalOptions()
    if not model_refs:
        raise JobError("no model to evaluate: give at least one reference")
    opts.check()
    outputs.check_out(out)
    card = load_card(data)
    vocab = load_vocab(data, card)
    card_bytes = fs.read_bytes(fs.join(data, CARD))
    if opts.split not in card.splits:
        raise JobError(f"data set {data} has no split {opts.split!r} (it has {list(card.splits)})")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    resolved: list[refs.ModelRef] = []
    try:
        for r in model_refs:
            resolved.append(refs.resolve(r, uri))
        models = [load_eval_model(m, data, card, vocab) for m in resolved]
        cut = max(m.weights.config.data.max_words for m in models)  # the models' longest
        split = read_split(data, opts.split, card, max_words=cut)
        n = protocol_images(opts.protocol, len(split.image_ids), opts.fold_size)
        if n < len(split.image_ids):
            split = split.head(n)
        data_fp = data_fingerprint(card_bytes, split)
        with OutLock(out, log=log) as lock:
            outputs.check_out(out)  # again, now that no other evaluation writes there
            outputs.mark_incomplete(out)
            log(
                f"evaluating {len(models)} model(s) on {data} [{opts.split}], protocol "
                f"{opts.protocol}: {n} images x {len(split.captions)} captions"
            )
            job = _Job(models, data, split, out, opts, vocab)
            t0 = time.perf_counter()
            sims = _matrices(job, data_fp, log, lock.check)
            seconds = time.perf_counter() - t0
            metrics = protocol_metrics(opts.protocol, sims, split.caption_image, opts.fold_size)
            lock.check()
            result = _write(job, sims, metrics, seconds)
            result.card = card
    finally:
        refs.cleanup(resolved)
    log(result.table)
    return result


def _matrices(
    job: _Job, data_fp: str, log: Callable[[str], None], guard: Callable[[], None]
) -> dict[str, np.ndarray]:
    """Every model's four matrices, averaged; tiles a previous run stored are reused."""
    try:
        ray = init_ray(log)
    except ConnectionError as e:
        raise JobError(f"cannot reach the Ray cluster: {e}") from e
    models, split, out, opts = job.models, job.split, job.out, job.opts
    res: Resources = plan_group(actor_request(opts), ray.cluster_resources())
    start_within = opts.wait_timeout_s  # the actors start within this (locally: they wait)
    if on_cluster():
        waited = wait_for_room(res, opts.wait_timeout_s, noun="actor", strategy="SPREAD", log=log)
        start_within = max(120.0, opts.wait_timeout_s - waited)
    log(f"scoring on {res.describe('actor')}")
    pool = tiles.start_pool([m.weights for m in models], res, opts.bf16, opts.block)
    order = np.argsort([len(t) for t in split.tokens], kind="stable").tolist()
    total: dict[str, np.ndarray] | None = None
    try:
        device = tiles.device_kinds(pool, start_within)
        log(f"actors on nodes {', '.join(tiles.actor_nodes(pool))}")
        for i in range(len(models)):
            fp = tile_fingerprint(data_fp, models[i].files, job, device)
            plan = tiles.Plan(
                len(split.image_ids),
                len(split.captions),
                opts.tile_images,
                opts.tile_captions,
                order,
                fp,
            )
            store = tiles.TileStore(fs.join(out, "tiles", f"model-{i}"), plan, log, guard)
            sims = tiles.compute(pool, plan, store, split, model_index=i)
            total = sims if total is None else {k: total[k] + sims[k] for k in sims}
    finally:
        for a in pool.actors:
            ray.kill(a)
    assert total is not None  # evaluate() refuses an empty list of models
    sims = {k: v / len(models) for k, v in total.items()}
    tiles.check_complete(plan, sims, "the averaged matrix")
    return sims


def _write(
    job: _Job, sims: dict[str, np.ndarray], metrics: dict[str, dict], seconds: float
) -> EvalResult:
    """The outputs in ``--out`` (matrices, metrics.json, recall.md, pictures)."""
    models, data, split, out, opts = job.models, job.data, job.split, job.out, job.opts
    refs_txt = ", ".join(m.ref.ref for m in models)
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
    extra.update(
        attention_pictures(
            models[0].model,
            job.vocab,
            split,
            rows=np.arange(len(split.image_ids)),
            sims=sims["total"],
            cap_rows=split.caption_image,
        )
    )
    meta = {
        "model": [m.ref.ref for m in models],
        "data": data,
        "split": opts.split,
        "protocol": opts.protocol,
        "images": len(split.image_ids),
        "captions": len(split.captions),
        "seconds": seconds,
    }
    doc = {**metrics, "meta": meta}
    table = format_table(metrics)
    recall_md = f"{header}\n\n{table}\n"
    names = outputs.write_outputs(out, sims, index, doc, extra=extra, recall_md=recall_md)
    return EvalResult(metrics, table, names, doc, [m.ref for m in models])
