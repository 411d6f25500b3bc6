"""The images x captions matrix as tiles: the plan, the store that persists finished tiles
(local or ``s3://``), and the pool of Ray actors that scores them.

Images and captions are encoded once (a chunk per tile row or column, shared out among the
actors); a tile is scored from the encodings of its row and column, so an actor's memory is
bounded by the tile size, not by the split. Each finished tile is written under the output
location at once; a rerun with the same location skips the tiles already there.

Nothing is reported that was not computed: the assembled matrices start as NaN, a stored tile
is used only when it reads back whole, of the tile's shape and finite (else it is recomputed),
and :func:`check_complete` refuses a matrix with a cell left unfilled. A store whose
``plan.json`` is not this evaluation's (another fingerprint: other data, model, precision,
device kind, tile sizes...), is unreadable, or is missing while tiles are there, has its tiles
deleted and recomputed.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from shan.data import fs
from shan.data.reader import SplitArrays
from shan.errors import JobError
from shan.metrics import SCORES
from shan.progress import Progress
from shan.runtime import Resources

IMAGE_F = ("v", "mask", "vp", "vg", "pv")  # EncodedImages' fields, in order
CAPTION_FIELDS = ("t", "mask", "tp", "tq", "u1t")  # EncodedCaptions' fields, in order
PLAN_FILE = "plan.json"
TILE_NAME = re.compile(r"^tile-r(\d{5})-c(\d{5})\.npz$")
# a killed write's temporary (fs.write_atomic's ``.NAME.tmp-XXXXXXXX``; ``NAME.tmp-PID`` before)
TILE_TMP = re.compile(r"^\.?(tile-r\d{5}-c\d{5}\.npz|plan\.json)\.tmp-\w+$")


@dataclass
class Plan:
    """How the (images, captions) matrix is cut. Columns follow ``caption_order`` (captions
    sorted by length, so a tile carries little padding)."""

    n_images: int
    n_captions: int
    tile_images: int
    tile_captions: int
    caption_order: list[int]
    fingerprint: str  # what the tiles depend on: tiles of another evaluation are never reused

    def __post_init__(self) -> None:
        if self.tile_images < 1 or self.tile_captions < 1:
            raise JobError(
                f"tile sizes must be at least 1 (got {self.tile_images} x {self.tile_captions})"
            )
        if sorted(self.caption_order) != list(range(self.n_captions)):
            raise JobError("caption_order must be a permutation of the captions")

    @property
    def shape(self) -> tuple[int, int]:
        return -(-self.n_images // self.tile_images), -(-self.n_captions // self.tile_captions)

    def tiles(self) -> list[tuple[int, int]]:
        rows, cols = self.shape
        return [(r, c) for r in range(rows) for c in range(cols)]

    def rows(self, r: int) -> slice:
        return slice(r * self.tile_images, min(self.n_images, (r + 1) * self.tile_images))

    def cols(self, c: int) -> np.ndarray:
        order = self.caption_order
        return np.asarray(order[c * self.tile_captions : (c + 1) * self.tile_captions])

    def tile_shape(self, r: int, c: int) -> tuple[int, int]:
        rows = self.rows(r)
        return rows.stop - rows.start, len(self.cols(c))


def tile_problem(plan: Plan, r: int, c: int, tile: object) -> str | None:
    """Why ``tile`` cannot be tile (r, c) of ``plan`` (None: it can)."""
    if not isinstance(tile, dict):
        return f"not a set of matrices ({type(tile).__name__})"
    want = plan.tile_shape(r, c)
    for k in SCORES:
        a = tile.get(k)
        if a is None:
            return f"no {k!r} matrix"
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f":
            return f"{k!r} is not a floating-point matrix"
        if a.shape != want:
            return f"{k!r} has shape {a.shape}, expected {want}"
        if not np.isfinite(a).all():
            return f"{k!r} holds NaN or infinite values"
    return None


class TileStore:
    """``ROOT/plan.json`` and one ``.npz`` per finished tile.

    Opening a store whose plan is not ``plan`` (or is unreadable, or is missing while tiles are
    there) deletes its tiles: they are this project's own files, of another evaluation.
    ``guard`` is called before each write (the output lock checks it is still held)."""

    KEYS: tuple[str, ...] = SCORES  # the arrays of a tile's .npz

    def __init__(
        self,
        root: str,
        plan: Plan,
        log: Callable[[str], None] = print,
        guard: Callable[[], None] | None = None,
    ) -> None:
        self.root, self.plan, self.log, self.guard = root, plan, log, guard
        old, why = self._read_plan()
        if old != asdict(plan):
            if why is not None or self.listed() or self._temporaries():
                self.log(f"{root}: {why or 'tiles of another evaluation'}; recomputing them")
            self.clear()
            self._write(fs.join(root, PLAN_FILE), json.dumps(asdict(plan)).encode())

    def _read_plan(self) -> tuple[dict[str, Any] | None, str | None]:
        """(stored plan, None) or (None, why it is unusable); (None, None): no plan.json."""
        path = fs.join(self.root, PLAN_FILE)
        if not fs.exists(path):
            return None, None
        try:
            data = json.loads(fs.read_bytes(path))
        except (fs.StorageError, ValueError) as e:  # UnicodeDecodeError, JSONDecodeError
            return None, f"its {PLAN_FILE} is unreadable ({type(e).__name__})"
        if not isinstance(data, dict) or set(data) != set(type(self.plan).__dataclass_fields__):
            return None, f"its {PLAN_FILE} is not a tile plan"
        return data, None

    def _names(self) -> list[str]:
        filesystem, path = fs.filesystem(self.root)
        try:
            infos = filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        except OSError as e:
            raise fs.StorageError(f"cannot list {self.root}: {e}") from e
        return [i.base_name for i in infos if i.type == pafs.FileType.File]

    def listed(self) -> set[tuple[int, int]]:
        """The tiles that have a file (readable or not)."""
        return {(int(m[1]), int(m[2])) for n in self._names() if (m := TILE_NAME.match(n))}

    def _temporaries(self) -> list[str]:
        return [n for n in self._names() if TILE_TMP.match(n)]

    def clear(self) -> None:
        """Delete this store's plan and tiles (its own files only, by name)."""
        if self.guard is not None:
            self.guard()
        for name in self._names():
            if name == PLAN_FILE or TILE_NAME.match(name) or TILE_TMP.match(name):
                fs.delete_tree(fs.join(self.root, name))

    def _path(self, r: int, c: int) -> str:
        return fs.join(self.root, f"tile-r{r:05d}-c{c:05d}.npz")

    def done(self, r: int, c: int) -> bool:
        return fs.exists(self._path(r, c))

    def _write(self, path: str, data: bytes) -> None:
        if self.guard is not None:
            self.guard()
        fs.write_atomic(path, data, make_parents=True)  # never a half-written file

    def problem(self, r: int, c: int, tile: object) -> str | None:
        """Why ``tile`` cannot be tile (r, c) of this store's plan (None: it can)."""
        return tile_problem(self.plan, r, c, tile)

    def save(self, r: int, c: int, sims: dict[str, np.ndarray]) -> None:
        why = self.problem(r, c, sims)
        if why is not None:
            raise JobError(f"tile ({r}, {c}) is not saved: {why}")
        buf = io.BytesIO()
        # numpy's stub types every ** value as a possible ``allow_pickle`` flag
        np.savez(buf, **{k: sims[k] for k in self.KEYS})  # type: ignore[arg-type]
        self._write(self._path(r, c), buf.getvalue())

    def load(self, r: int, c: int) -> dict[str, np.ndarray] | None:
        """Tile (r, c), or None (and a log line) when it is missing, unreadable, of another
        shape or not finite: such a tile is recomputed, never used."""
        path = self._path(r, c)
        try:
            with np.load(io.BytesIO(fs.read_bytes(path)), allow_pickle=False) as z:
                tile = {k: z[k] for k in self.KEYS if k in z.files}
        except (fs.StorageError, OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            self.log(f"{path}: unreadable ({type(e).__name__}); recomputing it")
            return None
        why = self.problem(r, c, tile)
        if why is not None:
            self.log(f"{path}: {why}; recomputing it")
            return None
        return tile


def empty_matrices(plan: Plan) -> dict[str, np.ndarray]:
    """NaN everywhere: a cell that no tile fills is never mistaken for a score."""
    return {k: np.full((plan.n_images, plan.n_captions), np.nan, dtype=np.float32) for k in SCORES}


def place(plan: Plan, sims: dict[str, np.ndarray], r: int, c: int, tile: dict) -> None:
    why = tile_problem(plan, r, c, tile)
    if why is not None:
        raise JobError(f"tile ({r}, {c}): {why}")
    rows, cols = plan.rows(r), plan.cols(c)
    for k in SCORES:
        sims[k][rows, cols] = tile[k]


def load_finished(plan: Plan, store: TileStore) -> tuple[dict[str, np.ndarray], list]:
    """(matrices holding every usable stored tile, NaN elsewhere; the tiles still to score)."""
    sims, todo = empty_matrices(plan), []
    listed = store.listed()
    for r, c in plan.tiles():
        tile = store.load(r, c) if (r, c) in listed else None
        if tile is None:
            todo.append((r, c))
        else:
            place(plan, sims, r, c, tile)
    return sims, todo


def check_complete(plan: Plan, sims: dict[str, np.ndarray], what: str = "the matrix") -> None:
    """JobError unless every cell of every matrix is filled and finite."""
    want = (plan.n_images, plan.n_captions)
    for k in SCORES:
        a = sims.get(k)
        if a is None or a.shape != want:
            got = None if a is None else a.shape
            raise JobError(f"{what} ({k}) has shape {got}, expected {want}")
        if np.isfinite(a).all():
            continue
        bad = [
            (r, c)
            for r, c in plan.tiles()
            if not np.isfinite(a[plan.rows(r)][:, plan.cols(c)]).all()
        ]
        more = " ..." if len(bad) > 5 else ""
        raise JobError(
            f"{what} is incomplete: {int((~np.isfinite(a)).sum())} {k} scores are missing or "
            f"not finite (tiles {bad[:5]}{more}); no metrics were written"
        )


class TileScorer:
    """A Ray actor holding the models; encodes chunks and scores tiles."""

    def __init__(self, checkpoints: list[Any], threads: int, bf16: bool, block: int | None) -> None:
        """``checkpoints``: weights-only :class:`~shan.checkpoint.Checkpoint` s (or their
        object refs), built and checked the same way the driver loaded them."""
        import ray
        import torch

        from shan.checkpoint import model_from_checkpoint

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.bf16, self.block, self.models = bf16, block, []
        for i, ckpt in enumerate(checkpoints):
            ckpt = ray.get(ckpt) if isinstance(ckpt, ray.ObjectRef) else ckpt
            self.models.append(model_from_checkpoint(ckpt, self.device, where=f"model {i}"))

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The address of the node this actor runs on."""
        import ray.util

        return str(ray.util.get_node_ip_address())

    def device_kind(self) -> tuple[str, str]:
        """(device kind: ``cpu`` or ``cuda:<GPU name>``, effective precision)."""
        import torch

        if self.device.type == "cuda":
            kind = f"cuda:{torch.cuda.get_device_name(self.device)}"
            return kind, "bf16" if self.bf16 else "float32"
        return "cpu", "float32"  # bf16 is used on CUDA only

    def encode_images(
        self, m: int, features: np.ndarray, counts: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """A tile row's images (B, R, F), region counts (B,) -> v (B, R, d) float32, mask
        (B, R) bool (the scorer's other image terms are made again from them per tile)."""
        from shan.scoring import encode_images

        chunk = max(1, len(features))  # the row is the chunk
        im = encode_images(self.models[m], features, counts, self.device, chunk=chunk,
                           bf16=self.bf16)  # fmt: skip
        return im.v.numpy(), im.mask.numpy()

    def encode_captions(self, m: int, tokens: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        import torch

        from shan.data.reader import pad_tokens
        from shan.scoring import autocast

        toks, lens = pad_tokens(tokens)
        with torch.no_grad(), autocast(self.device, self.bf16):
            cap = self.models[m].encode_captions(toks.to(self.device), lens.to(self.device))
            return cap.t.float().cpu().numpy(), cap.mask.cpu().numpy()

    def score_tile(
        self,
        m: int,
        images: tuple[np.ndarray, np.ndarray],
        captions: tuple[np.ndarray, np.ndarray],
    ) -> dict[str, np.ndarray]:
        """images: (v (Bi, k, d), mask); captions: (t (Bc, n, d), mask) -> 4 (Bi, Bc) arrays."""
        import torch

        from shan.scoring import autocast

        model = self.models[m]
        with torch.no_grad(), autocast(self.device, self.bf16):
            v, vm = (torch.as_tensor(np.array(x)).to(self.device) for x in images)
            t, tm = (torch.as_tensor(np.array(x)).to(self.device) for x in captions)
            sims = model.score(model.image_terms(v, vm), model.caption_terms(t, tm), self.block)
            return {k: sims[k].float().cpu().numpy() for k in SCORES}

    # -- rerank (shan.eval.rerank) ---------------------------------------------------------------
    def rerank_images(
        self, m: int, features: np.ndarray, counts: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A chunk of images (B, R, F), region counts (B,) -> (the encoded images' fields
        (:class:`~shan.model.EncodedImages`, numpy, B rows), first-stage vectors (B, D))."""
        from shan.scoring import encode_images, image_vectors

        model, chunk = self.models[m], max(1, len(features))
        im = encode_images(model, features, counts, self.device, chunk=chunk, bf16=self.bf16)
        vec = image_vectors(model, features, counts, self.device, chunk=chunk, bf16=self.bf16)
        return {f: getattr(im, f).numpy() for f in IMAGE_F}, vec

    def rerank_captions(
        self, m: int, tokens: list[list[int]]
    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """A chunk of captions -> (the encoded captions' fields (numpy, padded to the chunk's
        longest), first-stage vectors (B, D))."""
        import torch

        from shan.data.reader import pad_tokens
        from shan.scoring import autocast, caption_vectors

        model = self.models[m]
        toks, lens = pad_tokens(tokens)
        with torch.no_grad(), autocast(self.device, self.bf16):
            cap = model.encode_captions(toks.to(self.device), lens.to(self.device))
        fields = {f: _numpy(getattr(cap, f)) for f in CAPTION_FIELDS}
        return fields, caption_vectors(model, tokens, self.device, chunk=max(1, len(tokens)))

    def rerank_tile(
        self, m: int, by: str, queries: np.ndarray, candidates: np.ndarray, parts: list[Any]
    ) -> dict[str, np.ndarray]:
        """Queries (Q,) rows (captions ``by="caption"``, images ``by="image"``), candidates
        (Q, K) rows of the other side -> {"candidates" (Q, K) int32, "total", "l2l", "g2l",
        "g2g" (Q, K) float32} (:func:`shan.scoring.rerank_scores`). ``parts``: [image chunk
        refs, caption chunk refs] of :meth:`rerank_images` / :meth:`rerank_captions`, gathered
        once per actor (and again after a restart)."""
        import torch

        from shan.scoring import autocast, rerank_scores

        images, captions = self._held(m, parts)
        q = torch.from_numpy(np.array(queries, dtype=np.int64)).to(self.device)
        candidates = np.array(candidates)  # Ray's arrays are read-only: torch wants its own
        with autocast(self.device, self.bf16):
            if by == "caption":
                got = rerank_scores(self.models[m], images, captions[q], candidates, by=by)
            else:
                got = rerank_scores(self.models[m], images[q], captions, candidates, by=by)
        return {"candidates": candidates.astype(np.int32), **got}

    def _held(self, m: int, parts: list[Any]) -> tuple[Any, Any]:
        """Model ``m``'s encoded split (images, captions) on this actor's device."""
        import ray
        import torch

        from shan.model import EncodedCaptions, EncodedImages

        held = getattr(self, "held", {})
        if m not in held:
            image_parts, caption_parts = (ray.get(list(p)) for p in parts)
            n = max(x[0]["t"].shape[1] for x in caption_parts)

            def cat(chunks: list[dict], f: str, pad: int | None = None) -> torch.Tensor:
                arrays = [c[f] if pad is None else _pad_words(c[f], pad) for c in chunks]
                return torch.from_numpy(np.concatenate(arrays)).to(self.device)

            images = EncodedImages(*(cat([p[0] for p in image_parts], f) for f in IMAGE_F))
            captions = EncodedCaptions(
                *(cat([p[0] for p in caption_parts], f, n) for f in CAPTION_FIELDS)
            )
            held[m] = (images, captions)
            self.held = held
        return held[m]


@dataclass
class Pool:
    """Actors and their resources."""

    actors: list[Any]  # ray actor handles of TileScorer
    refs: list[Any]  # the checkpoints in the object store, kept alive for actor restarts
    per_actor: int = 2  # tiles in flight per actor


def start_pool(checkpoints: list[Any], res: Resources, bf16: bool, block: int | None) -> Pool:
    """``res.count`` :class:`TileScorer` actors holding ``checkpoints`` (weights only)."""
    import ray

    cls = ray.remote(TileScorer).options(
        num_cpus=res.cpus_each,
        num_gpus=res.gpus_each,
        max_restarts=2,
        max_task_retries=2,
        scheduling_strategy="SPREAD",  # over the nodes, where there are several
    )
    refs = [ray.put(ckpt) for ckpt in checkpoints]
    actors = [cls.remote(refs, res.torch_threads, bf16, block) for _ in range(res.count)]
    return Pool(actors, refs)


def actor_nodes(pool: Pool) -> list[str]:
    """The node address of each actor (they have started: see :func:`device_kinds`)."""
    import ray

    return ray.get([a.node.remote() for a in pool.actors])


def device_kinds(pool: Pool, timeout: float) -> tuple[str, str]:
    """(device kinds of the actors, effective precisions), each a sorted comma-joined list;
    a JobError when the actors fail or do not start within ``timeout`` seconds."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    from shan.runtime import failure_line

    try:
        got = ray.get([a.device_kind.remote() for a in pool.actors], timeout=timeout)
    except GetTimeoutError:
        raise JobError(
            f"the {len(pool.actors)} evaluation actor(s) did not start within {timeout:g} s: "
            "the cluster cannot fit them (see --actors, --cpus-per-actor, --gpus-per-actor)"
        ) from None
    except RayActorError as e:
        raise JobError(f"the evaluation actors failed to start: {failure_line(e)}") from None
    return ",".join(sorted({k for k, _ in got})), ",".join(sorted({p for _, p in got}))


def compute(
    pool: Pool,
    plan: Plan,
    store: TileStore,
    split: SplitArrays,
    *,
    model_index: int = 0,
) -> dict[str, np.ndarray]:
    """Score every tile that ``store`` does not hold usable and assemble the full matrices
    (checked complete and finite). ``split``: features (N, R, F), num_regions (N,), tokens.
    Tiles finished out of the total are reported on stderr (:class:`shan.progress.Progress`)."""
    features, counts, tokens = split.features, split.num_regions, split.tokens
    sims, todo = load_finished(plan, store)
    need_r, need_c = sorted({r for r, _ in todo}), sorted({c for _, c in todo})
    a = pool.actors
    img = {
        r: a[i % len(a)].encode_images.remote(
            model_index, features[plan.rows(r)], counts[plan.rows(r)]
        )
        for i, r in enumerate(need_r)
    }
    cap = {
        c: a[i % len(a)].encode_captions.remote(model_index, [tokens[j] for j in plan.cols(c)])
        for i, c in enumerate(need_c)
    }
    total = len(plan.tiles())
    already = total - len(todo)
    progress = Progress(
        f"score model {model_index}",
        total,
        "tiles",
        start=already,
        note=f"{already} already done" if already else "",
    )
    with progress:
        run_tiles(
            pool,
            store,
            todo=todo,
            submit=lambda actor, t: actor.score_tile.remote(model_index, img[t[0]], cap[t[1]]),
            done=lambda t, scores: place(plan, sims, *t, scores),
            what=f"model {model_index}",
            progress=progress,
        )
    check_complete(plan, sims)
    return sims


def run_tiles(
    pool: Pool,
    store: TileStore,
    *,
    todo: list[tuple[int, int]],
    submit: Callable[[Any, tuple[int, int]], Any],
    done: Callable[[tuple[int, int], dict[str, np.ndarray]], None],
    what: str,
    progress: Progress,
) -> None:
    """Score the ``todo`` tiles on the pool's actors (``submit(actor, tile)``: the object ref of
    the tile's scores), checking, saving and passing each to ``done``; an actor that dies has
    its tile redone by another."""
    import ray
    from ray.exceptions import RayActorError

    a = pool.actors
    queue = list(todo)
    pending: dict[Any, tuple[Any, tuple[int, int]]] = {}  # object ref: (actor, tile)
    alive, failures = list(a), {id(x): 0 for x in a}

    def send(actor: Any) -> None:
        if queue:
            tile = queue.pop(0)
            pending[submit(actor, tile)] = (actor, tile)

    for actor in alive:
        for _ in range(pool.per_actor):
            send(actor)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        actor, tile = pending.pop(ready[0])
        try:
            scores = ray.get(ready[0])
        except RayActorError:
            queue.append(tile)  # the actor died mid-tile: the tile is redone
            failures[id(actor)] += 1
            if failures[id(actor)] > 3 and actor in alive:
                alive.remove(actor)  # restarted too often: give its work to the others
            if not alive:
                raise JobError("every evaluation actor died; see the Ray logs") from None
            send(actor if actor in alive else min(alive, key=_load(pending)))
            continue
        why = store.problem(*tile, scores)
        if why is not None:
            raise JobError(f"{what} scored tile {tile} wrong: {why}")
        store.save(*tile, scores)
        done(tile, scores)
        progress.update()
        send(actor)


def _numpy(x: Any) -> np.ndarray:
    """A tensor on any device -> numpy (float32, or bool for masks)."""
    return x.float().cpu().numpy() if x.dtype.is_floating_point else x.cpu().numpy()


def _pad_words(a: np.ndarray, n: int) -> np.ndarray:
    """(B, m, ...) -> (B, n, ...): zeros (False for a mask) after the m words."""
    if a.shape[1] == n:
        return a
    pad = [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad)


def _load(pending: dict[Any, tuple[Any, tuple[int, int]]]) -> Callable[[Any], int]:
    return lambda actor: sum(1 for a, _ in pending.values() if a is actor)


def assemble(plan: Plan, store: TileStore) -> dict[str, np.ndarray]:
    """The matrices from the stored tiles alone; JobError when a tile is missing or bad."""
    sims, todo = load_finished(plan, store)
    if todo:
        raise JobError(f"{store.root}: {len(todo)} tile(s) missing or unusable, e.g. {todo[0]}")
    check_complete(plan, sims)
    return sims
