"""Evaluate trained models on a split: the whole similarity matrix on a pool of Ray actors,
the protocol's metrics, the outputs, and an MLflow run of its own.

Everything a user can get wrong is checked before any Ray actor starts: the options, the output
location (only an evaluation's own files, and no other evaluation writing there: a lock), the
data set, and every checkpoint (loaded in full: weights, config, vocabulary, finite weights).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from shan.checkpoint import load_checked, require_first_stage
from shan.config import Checked, Problems
from shan.data import fs
from shan.data.format import CARD, DatasetCard, load_card, load_vocab
from shan.data.reader import SplitArrays, read_split
from shan.errors import JobError
from shan.eval import PROTOCOLS, outputs, rerank, tiles
from shan.eval.lock import OutLock
from shan.fingerprint import data_fingerprint, digest, scorer_digest
from shan.metrics import fold_metrics, format_table, recall_metrics
from shan.pictures import attention_pictures
from shan.runtime import GroupRequest, Resources, init_ray, on_cluster, plan_group, wait_for_room
from shan.tracking import refs
from shan.vocab import Vocabulary

_T = TypeVar("_T")

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
    rerank: int | None = None  # K: score each query against its top K first-stage candidates
    compare: str | None = None  # an exhaustive evaluation's --out to compare the rerank with

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
        if self.rerank is not None:
            k = self.rerank
            if not isinstance(k, int) or isinstance(k, bool) or k < rerank.MAX_RECALL_K:
                p.bad("rerank", k, f"an integer >= {rerank.MAX_RECALL_K} (K: R@10 needs 10)")
            if self.protocol == "coco-1k":
                p.append("rerank: protocol coco-1k averages folds; rerank the whole split instead")
        elif self.compare is not None:
            p.append(f"compare {self.compare!r}: compares a rerank; give rerank (K) too")
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
    folder: str | None = None  # where ``names`` are, when not in --out (a rerank's)

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
        if opts.rerank is not None:
            job = _Job(models, data, split, out, opts, vocab)
            _check_rerank(job)  # before any work
            with OutLock(out, log=log) as lock:
                outputs.check_out(out)
                result = _rerank(job, data_fp, log, lock.check)
                result.card = card
            log(result.table)
            return result
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


def _on_pool(
    job: _Job, log: Callable[[str], None], work: Callable[[tiles.Pool, tuple[str, str]], _T]
) -> _T:
    """``work(pool, device)`` on a started pool of the evaluation's actors, killed after."""
    try:
        ray = init_ray(log)
    except ConnectionError as e:
        raise JobError(f"cannot reach the Ray cluster: {e}") from e
    opts = job.opts
    res: Resources = plan_group(actor_request(opts), ray.cluster_resources())
    start_within = opts.wait_timeout_s  # the actors start within this (locally: they wait)
    if on_cluster():
        waited = wait_for_room(res, opts.wait_timeout_s, noun="actor", strategy="SPREAD", log=log)
        start_within = max(120.0, opts.wait_timeout_s - waited)
    log(f"scoring on {res.describe('actor')}")
    pool = tiles.start_pool([m.weights for m in job.models], res, opts.bf16, opts.block)
    try:
        device = tiles.device_kinds(pool, start_within)
        log(f"actors on nodes {', '.join(tiles.actor_nodes(pool))}")
        return work(pool, device)
    finally:
        for a in pool.actors:
            ray.kill(a)


def _matrices(
    job: _Job, data_fp: str, log: Callable[[str], None], guard: Callable[[], None]
) -> dict[str, np.ndarray]:
    """Every model's four matrices, averaged; tiles a previous run stored are reused."""
    models, split, out, opts = job.models, job.split, job.out, job.opts
    order = np.argsort([len(t) for t in split.tokens], kind="stable").tolist()
    plan: tiles.Plan | None = None

    def work(pool: tiles.Pool, device: tuple[str, str]) -> dict[str, np.ndarray]:
        nonlocal plan
        total: dict[str, np.ndarray] | None = None
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
        assert total is not None  # evaluate() refuses an empty list of models
        return total

    total = _on_pool(job, log, work)
    assert plan is not None
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
    doc = {**metrics, "meta": {**_meta(job), "seconds": seconds}}
    table = format_table(metrics)
    recall_md = f"{header}\n\n{table}\n"
    names = outputs.write_outputs(out, sims, index, doc, extra=extra, recall_md=recall_md)
    return EvalResult(metrics, table, names, doc, [m.ref for m in models])


def scorer_of(m: EvalModel) -> str:
    """:func:`shan.fingerprint.scorer_digest` of ``m``: equal for checkpoints that score alike
    (a first stage fitted by ``shan index head`` leaves it as it was)."""
    cfg = m.weights.config
    keys = {k: v for k, v in cfg.flat().items() if k.startswith("model.")}
    return scorer_digest(m.model.state_dict(), keys, cfg.data.max_words)


def _meta(job: _Job) -> dict:
    """What an evaluation's metrics.json says it evaluated (its ``meta``, less the time)."""
    return {
        "model": [m.ref.ref for m in job.models],
        "scorer": [scorer_of(m) for m in job.models],
        "data": job.data,
        "split": job.opts.split,
        "protocol": job.opts.protocol,
        "images": len(job.split.image_ids),
        "captions": len(job.split.captions),
    }


def _check_rerank(job: _Job) -> None:
    """JobError / CheckpointError for a rerank that cannot run, before any work."""
    opts, models, split = job.opts, job.models, job.split
    assert opts.rerank is not None
    if len(models) > 1:
        raise JobError("--rerank scores one model: it cannot run with --ensemble")
    require_first_stage(models[0].model, models[0].ref.ref)
    why = rerank.check_k(opts.rerank, len(split.image_ids), len(split.captions))
    if why is not None:
        raise JobError(why)
    if opts.compare is not None and rerank.exhaustive_metrics(opts.compare, _meta(job)) is None:
        raise JobError(
            f"--compare {opts.compare}: it holds no finished exhaustive evaluation (metrics.json) "
            f"of {models[0].ref.ref} on {job.data} [{opts.split}], protocol {opts.protocol}"
        )


def _rerank(
    job: _Job, data_fp: str, log: Callable[[str], None], guard: Callable[[], None]
) -> EvalResult:
    """Each query scored against its top K first-stage candidates (:mod:`shan.eval.rerank`),
    the recall of that, and its difference from an exhaustive evaluation when there is one."""
    opts, split, out, model = job.opts, job.split, job.out, job.models[0]
    assert opts.rerank is not None
    k, folder = opts.rerank, fs.join(out, rerank.RERANK_DIR)
    guard()
    fs.delete_tree(fs.join(folder, "metrics.json"))  # incomplete until the new one is written
    sizes = rerank.RerankPlan(len(split.image_ids), len(split.captions), k, opts.tile_images,
                              opts.tile_captions, "")  # fmt: skip
    log(
        f"evaluating {model.ref.ref} on {job.data} [{opts.split}], protocol {opts.protocol}, "
        f"rerank K = {k}: {sizes.n_images} images x {sizes.n_captions} captions"
    )
    t0 = time.perf_counter()

    def work(pool: tiles.Pool, device: tuple[str, str]) -> dict[int, dict[str, np.ndarray]]:
        first = rerank.first_stage(pool, split, sizes, 0)
        cands = rerank.candidates(first, k)
        log(
            f"rerank: each caption against its top {sizes.k_of(0)} images, each image against "
            f"its top {sizes.k_of(1)} captions (first stage, exact inner product)"
        )
        base = tile_fingerprint(data_fp, model.files, job, device)
        plan = dataclasses.replace(sizes, fingerprint=rerank.fingerprint(base, k, cands))
        root = fs.join(folder, "tiles", "model-0")
        store = rerank.RerankStore(root, plan, cands, log=log, guard=guard)
        return rerank.compute(pool, store, first, 0)

    results = _on_pool(job, log, work)
    seconds = time.perf_counter() - t0
    metrics = rerank.metrics(results, split.caption_image)
    meta = {**_meta(job), "rerank_k": k, "seconds": seconds}
    exhaustive = rerank.exhaustive_metrics(opts.compare or out, _meta(job))
    doc: dict = {**metrics, "meta": meta}
    table = format_table(metrics)
    if exhaustive is not None:
        doc["vs_exhaustive"] = rerank.differences(metrics, exhaustive)
        doc["exhaustive"] = exhaustive
        table += "\n\n" + rerank.format_differences(doc["vs_exhaustive"])
    header = (
        f"# Recall on {Path(job.data).name} [{opts.split}], protocol {opts.protocol}, rerank "
        f"K = {k}\n\nmodel: {model.ref.ref}; {meta['images']} images x {meta['captions']} "
        "captions; each query scored against its top K first-stage candidates only (a ground "
        "truth outside them is a miss, its rank counted as K + 1 in medr and meanr); recalls in "
        "percent (pessimistic ties)"
    )
    index = {
        "image_ids": split.image_ids.tolist(),
        "caption_image_ids": split.image_ids[split.caption_image].tolist(),
    }
    files = {
        "index.json": json.dumps(index).encode(),
        "recall.md": f"{header}\n\n{table}\n".encode(),
    }
    guard()
    names = rerank.write_outputs(folder, results, files=files, doc=doc)
    return EvalResult(metrics, table, names, doc, [model.ref], folder=folder)
