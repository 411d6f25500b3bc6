"""The index build job (``shan index build``): a model reference, a data set split and a
destination -> an index (:mod:`shan.index`) of the split's images for that model.

Everything a user can get wrong (the options, the split, the model, its first-stage head, the
destination) is checked before an image is encoded. The images are encoded on Ray Data actors
(one per GPU when asked, fractional CPUs on a small machine, sized by the rule training and
evaluation use: :func:`shan.runtime.plan_group`), each giving per image its first-stage vector
and its region embeddings ``v``; the driver writes them shard by shard
(:class:`shan.index.IndexWriter`), builds the FAISS index and writes the card last.

A destination that already holds the index of this model, data and split is left as it is
(nothing to do) unless ``overwrite``; one holding another index is replaced only with
``overwrite``; one holding anything else is refused.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import shan
from shan.checkpoint import (
    CheckedModel,
    Checkpoint,
    load_checked,
    require_first_stage,
    save_checkpoint,
)
from shan.config import FIRST_STAGE_DIM_MAX, FIRST_STAGE_POOLS, Checked, Problems
from shan.data import fs
from shan.data.format import CARD, DatasetCard, load_card, load_vocab
from shan.data.reader import SplitArrays, read_split
from shan.errors import JobError
from shan.fingerprint import data_fingerprint
from shan.index import SHARD_SIZE, IndexCard, IndexWriter, check_destination, model_digest
from shan.index.ann import KINDS
from shan.progress import Progress
from shan.runtime import GroupRequest, Resources, init_ray, plan_group
from shan.tracking import refs

COLUMNS = ["image_id", "features", "num_regions"]


@dataclass
class IndexOptions(Checked):
    """The build's options; :meth:`check` raises every problem at once."""

    kind: str = "auto"  # flat | ivf | hnsw | auto (shan.index.ann.choose_kind)
    actors: int | None = None
    cpus_per_actor: float | None = None
    gpus_per_actor: float | None = None
    batch_size: int = 256  # images an actor encodes at a time
    shard_size: int = SHARD_SIZE  # images a fragments file holds at most
    overwrite: bool = False
    local: bool = False  # encode in this process, without Ray (small sets)

    def problems(self) -> list[str]:
        """What is wrong with the options, one line each, named as the fields."""
        p = Problems()
        p.one_of("kind", self.kind, KINDS)
        p.at_least("actors", self.actors, 1, optional=True)
        p.positive("cpus_per_actor", self.cpus_per_actor, optional=True)
        g = self.gpus_per_actor
        if g is not None and not (
            isinstance(g, int | float) and 0 <= g < math.inf and (g <= 1 or float(g).is_integer())
        ):
            p.bad("gpus_per_actor", g, ">= 0, and whole above 1")
        p.at_least("batch_size", self.batch_size, 1)
        p.at_least("shard_size", self.shard_size, 1)
        return list(p)


@dataclass
class IndexResult:
    """The index's card, whether it was built (False: the destination held it already) and
    the seconds encoding and writing took."""

    card: IndexCard
    built: bool
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.card.images / self.seconds if self.seconds > 0 else 0.0


def actor_request(opts: IndexOptions) -> GroupRequest:
    """The encoding actors' request: one per GPU when asked, else CPU actors that leave a CPU
    to Ray Data's read tasks."""
    return GroupRequest(
        count=opts.actors,
        use_gpu=None if opts.gpus_per_actor is None else opts.gpus_per_actor > 0,
        cpus_each=opts.cpus_per_actor,
        gpus_each=opts.gpus_per_actor or 1.0,
        cpus_per_member_guess=2,
        max_cpus_each=4.0,
        check_fit=False,  # Ray Data's pool waits for room
        what="--actors x --cpus-per-actor",
        gpu_off="--gpus-per-actor 0",
    )


def build_index(
    model_ref: str,
    data: str,
    split: str,
    out: str,
    opts: IndexOptions | None = None,
    *,
    log: Callable[[str], None] = print,
) -> IndexResult:
    """Index ``data``'s ``split`` for the model ``model_ref`` (anything
    :func:`shan.tracking.refs.resolve` accepts) at ``out`` (a local folder or ``s3://``)."""
    opts = opts or IndexOptions()
    opts.check()
    existing = check_destination(out, overwrite=True, log=log)  # a foreign DEST: refused now
    card, loaded, name = checked_model(model_ref, data, split)
    require_first_stage(loaded.model, name)
    arrays = read_split(data, split, card, max_words=loaded.config.data.max_words)
    data_fp = data_fingerprint(fs.read_bytes(fs.join(data, CARD)), arrays)
    if existing is not None and not opts.overwrite:
        same = (existing.model_digest, existing.data_fingerprint, existing.split) == (
            model_digest(loaded.files), data_fp, split)  # fmt: skip
        if same:
            log(f"{out} already holds the index of model {model_ref} on {data} [{split}]: "
                "nothing to do (--overwrite builds it again)")  # fmt: skip
            return IndexResult(existing, built=False)
        check_destination(out, overwrite=False, log=log)  # refused: another index is there
    t0 = time.perf_counter()
    with IndexWriter(out, overwrite=opts.overwrite, shard_size=opts.shard_size, log=log) as w:
        batches = _encoded(loaded, data, split, arrays, opts, log=log)
        with Progress("encode images", len(arrays.image_ids), "images") as progress:
            for batch in batches:
                _check_order(batch["image_id"], arrays.image_ids, w.rows, split)
                w.add(batch["image_id"], batch["vectors"], batch["v"], batch["num_regions"])
                progress.update(len(batch["image_id"]))
        if w.rows != len(arrays.image_ids):
            raise JobError(f"encoded {w.rows} of the split's {len(arrays.image_ids)} images")
        result = w.commit(model=model_ref, model_files=loaded.files, data=data,
                          data_fingerprint=data_fp, split=split, kind=opts.kind,
                          created_by=f"shan index build (shan {shan.__version__})")  # fmt: skip
    seconds = time.perf_counter() - t0
    params = ", ".join(f"{k} {v}" for k, v in result.params.items())
    log(f"index of {result.images} images ({result.kind}{', ' + params if params else ''}; "
        f"{len(result.shards)} shard(s)) written to {out} in {seconds:.1f} s")  # fmt: skip
    return IndexResult(result, built=True, seconds=seconds)


def _check_order(ids: np.ndarray, want: np.ndarray, start: int, split: str) -> None:
    if not np.array_equal(np.asarray(ids), want[start : start + len(ids)]):
        raise JobError(f"the encoded images of split {split} came out of order (rows {start}+)")


def _encoded(
    loaded: Any,
    data: str,
    split: str,
    arrays: SplitArrays,
    opts: IndexOptions,
    *,
    log: Callable[[str], None],
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of {image_id, vectors (B, D), v (B, k, d), num_regions (B,)}, in row order."""
    if opts.local:
        log(f"encoding {len(arrays.image_ids)} images in this process")
        encoder = EncodeActor(loaded.checkpoint, threads=0)
        for i0 in range(0, len(arrays.image_ids), opts.batch_size):
            rows = slice(i0, i0 + opts.batch_size)
            yield encoder({"image_id": arrays.image_ids[rows], "features": arrays.features[rows],
                           "num_regions": arrays.num_regions[rows]})  # fmt: skip
        return
    try:
        ray = init_ray(log)
    except ConnectionError as e:
        raise JobError(f"cannot reach the Ray cluster: {e}") from e
    res = plan_group(actor_request(opts), ray.cluster_resources())
    log(f"encoding {len(arrays.image_ids)} images on {res.describe('actor')}")
    yield from run_ray(loaded.checkpoint, data, split, res, opts.batch_size)


def run_ray(
    checkpoint: Any, data: str, split: str, res: Resources, batch_size: int
) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data: the split's Parquet files read in tasks, encoded by an actor pool; batches in
    the split's row order."""
    import ray
    import ray.data

    from shan.data.reader import open_split
    from shan.progress import quiet_ray_data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    quiet_ray_data(ctx, own_progress=True)  # the job reports the images done itself
    ds = open_split(data, split, columns=COLUMNS)
    ds = ds.map_batches(
        EncodeActor,
        fn_constructor_kwargs={"checkpoint": ray.put(checkpoint), "threads": res.torch_threads},
        compute=ray.data.ActorPoolStrategy(size=res.count),
        num_cpus=res.cpus_each,
        num_gpus=res.gpus_each,
        batch_size=batch_size,
        batch_format="numpy",
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


class EncodeActor:
    """Holds the model; turns batches of features into first-stage vectors and region
    embeddings (:meth:`SHAN.embed_images`, :meth:`SHAN.image_vectors`), in float32."""

    def __init__(self, checkpoint: Any, threads: int = 0) -> None:
        """``checkpoint``: a weights-only :class:`~shan.checkpoint.Checkpoint` (or its object
        ref)."""
        import torch

        from shan.checkpoint import model_from_checkpoint

        if threads:
            torch.set_num_threads(threads)
        if type(checkpoint).__name__ == "ObjectRef":  # run_ray's
            import ray

            checkpoint = ray.get(checkpoint)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model_from_checkpoint(checkpoint, self.device, where="the index's model")

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        import torch

        feats = np.asarray(batch["features"])
        if feats.dtype == object:  # a column of per-row arrays
            feats = np.stack(list(feats))
        counts = np.asarray(batch["num_regions"], dtype=np.int64)
        with torch.no_grad():
            f = torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32)).to(self.device)
            v, mask = self.model.embed_images(f, torch.from_numpy(counts).to(self.device))
            head = self.model.first_stage
            assert head is not None  # the driver refused a model without one
            vectors = head.images(v, mask)  # SHAN.image_vectors: from v and mask alone
        return {
            "image_id": np.asarray(batch["image_id"], dtype=np.int64),
            "vectors": vectors.float().cpu().numpy(),
            "v": v.float().cpu().numpy(),
            "num_regions": counts,
        }


__all__ = ["EncodeActor", "IndexOptions", "IndexResult", "build_index"]


# -- a first stage fitted afterwards (shan index head) ----------------------------------------
@dataclass
class HeadOptions(Checked):
    """``shan index head``'s options: the split fitted on, the head's size (None: the model's
    own, else 256), and :class:`shan.firststage.FitOptions`' epochs, batch, rate and pool."""

    split: str = "train"
    dim: int | None = None
    epochs: int = 5
    batch: int = 128
    lr: float = 1e-3
    pool: str = "max"

    def problems(self) -> list[str]:
        p = Problems()
        p.at_least("dim", self.dim, 1, optional=True)
        p.at_most("dim", self.dim, FIRST_STAGE_DIM_MAX)
        p.at_least("epochs", self.epochs, 1)
        p.at_least("batch", self.batch, 2)
        p.positive("lr", self.lr)
        p.one_of("pool", self.pool, FIRST_STAGE_POOLS)
        return list(p)


def fit_head(
    model_ref: str,
    data: str,
    out: str,
    opts: HeadOptions | None = None,
    *,
    log: Callable[[str], None] = print,
) -> str:
    """A copy of the model ``model_ref`` with a first stage fitted afterwards to its frozen
    encoders (:func:`shan.firststage.fit_first_stage`) on ``data``'s split, written as a new
    checkpoint folder ``out`` (new or empty: nothing is replaced). SHAN's weights are copied
    unchanged. Returns ``out``."""
    import torch  # here: the error paths above stay light

    from shan.firststage import FitOptions, fit_first_stage, with_head  # (torch too)

    opts = opts or HeadOptions()
    opts.check()
    dest = _check_new_folder(out)
    card, loaded, _ = checked_model(model_ref, data, opts.split)
    cfg = loaded.config
    dim = opts.dim or cfg.model.first_stage_dim or DEFAULT_HEAD_DIM
    arrays = read_split(data, opts.split, card, max_words=cfg.data.max_words)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device)
    tau = cfg.loss.first_stage_temperature
    fit = FitOptions(opts.epochs, opts.batch, opts.lr, tau, pool=opts.pool)
    captions = len(arrays.caption_image)
    log(f"fitting a first stage (D {dim}, {opts.pool} pool) to model {model_ref} on {data} "
        f"[{opts.split}]: {captions:,} captions, {opts.epochs} epochs of {opts.batch}")  # fmt: skip
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    if device.type == "cpu":  # a small model's ops are too small for threads: 2 threads were
        torch.set_num_threads(cpu_threads(cfg.model.d))  # 35x slower than 1 at d 64 (loaded box)
    try:
        head = fit_first_stage(model, arrays, dim, fit, report=lambda e, loss: log(
            f"epoch {e}: loss {loss:.4f}"))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    head_cfg = dataclasses.replace(cfg.model, first_stage_dim=dim, first_stage_pool=opts.pool)
    new_cfg = dataclasses.replace(cfg, model=head_cfg)
    ckpt = dataclasses.replace(loaded.checkpoint, weights=with_head(model, head), config=new_cfg)
    _save_new(dest, ckpt)
    log(f"first stage fitted in {time.perf_counter() - t0:.0f} s; the model with it: {out}")
    return out


DEFAULT_HEAD_DIM = 256  # the head's size for a model trained without one


def cpu_threads(d: int) -> int:
    """Torch threads for fitting a head to a model of size ``d`` on CPU: one per 256 of d,
    at most what torch has."""
    import torch

    return max(1, min(torch.get_num_threads(), d // 256))


def _check_new_folder(out: str) -> Path:
    """``out`` as a local folder that is new or empty (nothing is created yet); JobError
    otherwise."""
    if "://" in out:
        raise JobError(f"--out {out}: give a local folder (upload the checkpoint afterwards)")
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise JobError(f"--out {out} exists and is not an empty folder; it is left alone")
    return path


def _save_new(dest: Path, ckpt: Checkpoint) -> None:
    """Write ``ckpt`` beside ``dest``, then rename it into place: ``dest`` is never a
    half-written checkpoint. It must still be new or empty (checked again)."""
    _check_new_folder(str(dest))
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as e:
        raise JobError(f"--out {dest}: cannot create it ({e.strerror or e})") from None
    try:
        save_checkpoint(staging, ckpt)
        if dest.exists():
            dest.rmdir()  # empty (checked above)
        staging.rename(dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # the staging folder: all of it is ours
        raise


def checked_model(model_ref: str, data: str, split: str) -> tuple[DatasetCard, CheckedModel, str]:
    """(``data``'s card, the model ``model_ref`` loaded and checked against the data set, the
    reference as resolved), after checking that the data set has ``split``."""
    card = load_card(data)
    vocab = load_vocab(data, card)
    if split not in card.splits:
        raise JobError(f"data set {data} has no split {split!r} (it has {list(card.splits)})")
    resolved = refs.resolve(model_ref, os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        loaded = load_checked(resolved.path, card, vocab, name=resolved.ref, data=data)
    finally:
        refs.cleanup([resolved])
    return card, loaded, resolved.ref
