"""Evaluation with ``--rerank K``: each query scored by SHAN against its top K first-stage
candidates only, not against the whole split.

1. The evaluation's actors encode the split in chunks (images: tile_images a chunk; captions:
   tile_captions) and give each chunk's first-stage vectors (:func:`shan.scoring.image_vectors`,
   :func:`shan.scoring.caption_vectors`) with the chunk's encodings.
2. The driver finds the candidates by exact inner product (:func:`top_k`): each caption's top
   min(K, images) images (t2i) and each image's top K captions (i2t).
3. The actors score the candidates with :func:`shan.scoring.rerank_scores`, in tiles of queries
   (tile row 0: t2i, tile_captions captions a tile; row 1: i2t, tile_images images a tile),
   stored as the exhaustive tiles are (:class:`RerankStore`, a :class:`~shan.eval.tiles.
   TileStore`): resumable after a kill, fingerprinted (K and a digest of the candidates
   included), a tile used only when its candidates are this run's and its scores are whole.
4. The outputs, sparse, in ``OUT/rerank/`` (:data:`SPARSE_FILES`), ``metrics.json`` last.

Each actor holds the whole split's encodings (every candidate may be any image or caption).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from shan.data import fs
from shan.data.reader import SplitArrays
from shan.errors import JobError
from shan.eval import tiles
from shan.fingerprint import digest
from shan.metrics import KEYS, SCORES, sparse_recall_metrics
from shan.progress import Progress

RERANK_DIR = "rerank"  # under --out: the rerank's outputs and tiles
DIRECTIONS = ("t2i", "i2t")  # tile row 0: captions query images; row 1: images query captions
BY = {"t2i": "caption", "i2t": "image"}  # shan.scoring.rerank_scores' ``by``
SPARSE_FILES = tuple(f"{d}_{k}.npy" for d in DIRECTIONS for k in ("candidates", *SCORES))
MAX_RECALL_K = 10  # the largest k of R@k: K below it could not report R@10


def check_k(k: int, n_images: int, n_captions: int) -> str | None:
    """Why ``k`` cannot be a rerank K on a split of ``n_images`` x ``n_captions`` (None: it
    can). t2i uses min(K, images) candidates; K = the captions is the exhaustive ranking."""
    if k < MAX_RECALL_K:
        return f"--rerank {k}: K must be at least {MAX_RECALL_K} (the largest k of R@k)"
    if k > n_captions:
        return (
            f"--rerank {k}: K is larger than the split ({n_images} images x {n_captions} "
            f"captions); at most {n_captions}"
        )
    return None


@dataclass
class RerankPlan:
    """How the rerank's queries are cut into tiles (the store's ``plan.json``)."""

    n_images: int
    n_captions: int
    k: int
    tile_images: int
    tile_captions: int
    fingerprint: str  # what the tiles depend on (candidates included)

    def k_of(self, d: int) -> int:
        """Candidates a query of direction ``d`` (0: t2i, 1: i2t)."""
        return min(self.k, self.n_images) if d == 0 else min(self.k, self.n_captions)

    def n_queries(self, d: int) -> int:
        return self.n_captions if d == 0 else self.n_images

    def size(self, d: int) -> int:
        return self.tile_captions if d == 0 else self.tile_images

    def queries(self, d: int, c: int) -> slice:
        s = self.size(d)
        return slice(c * s, min(self.n_queries(d), (c + 1) * s))

    def tiles(self) -> list[tuple[int, int]]:
        return [(d, c) for d in (0, 1) for c in range(-(-self.n_queries(d) // self.size(d)))]


class RerankStore(tiles.TileStore):
    """``ROOT/plan.json`` and one ``tile-rD-cT.npz`` per finished tile of queries: direction D
    (0: t2i, 1: i2t), query tile T, holding the tile's candidates and their four scores."""

    KEYS = ("candidates", *SCORES)

    def __init__(self, root: str, plan: RerankPlan, candidates: dict[int, np.ndarray],
                 **kw: Any) -> None:  # fmt: skip
        self.candidates = candidates  # direction -> (Q, K) int32
        super().__init__(root, plan, **kw)  # type: ignore[arg-type]

    def problem(self, r: int, c: int, tile: object) -> str | None:
        """Why ``tile`` is not query tile ``c`` of direction ``r`` scored on this run's
        candidates (None: it is)."""
        if not isinstance(tile, dict):
            return f"not a set of arrays ({type(tile).__name__})"
        want = self.candidates[r][self.plan.queries(r, c)]  # type: ignore[attr-defined]
        got = tile.get("candidates")
        if not isinstance(got, np.ndarray) or got.shape != want.shape or (got != want).any():
            return "its candidates are not this evaluation's"
        for k in SCORES:
            a = tile.get(k)
            if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.shape != want.shape:
                return f"{k!r} is not a {want.shape} floating-point array"
            if not np.isfinite(a).all():
                return f"{k!r} holds NaN or infinite values"
        return None


def top_k(queries: np.ndarray, items: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """queries (Q, D), items (N, D) -> (Q, k) int32: each query's k items of highest inner
    product, best first (exact; ties: the lower row first), ``chunk`` queries at a time."""
    out = np.empty((len(queries), k), dtype=np.int32)
    for q0 in range(0, len(queries), chunk):
        s = queries[q0 : q0 + chunk] @ items.T  # (b, N)
        top = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else None
        if top is None:
            top = np.broadcast_to(np.arange(s.shape[1]), s.shape)
        vals = np.take_along_axis(s, top, axis=1)
        order = np.lexsort((top, -vals), axis=1)  # by score descending, then row
        out[q0 : q0 + chunk] = np.take_along_axis(top, order, axis=1)
    return out


@dataclass
class FirstStage:
    """The split encoded on the actors: first-stage vectors and the chunks' object refs."""

    image_vectors: np.ndarray  # (N, D)
    caption_vectors: np.ndarray  # (C, D)
    parts: list[list[Any]]  # [image chunk refs, caption chunk refs] of (fields, vectors)


def first_stage(pool: tiles.Pool, split: SplitArrays, plan: RerankPlan, m: int) -> FirstStage:
    """Model ``m``'s encodings and first-stage vectors of the split, chunk by chunk on the
    pool's actors (images tile_images a chunk, captions tile_captions)."""
    import ray

    a, n, c = pool.actors, plan.n_images, plan.n_captions
    img = [
        a[i % len(a)].rerank_images.remote(
            m,
            split.features[r0 : r0 + plan.tile_images],
            split.num_regions[r0 : r0 + plan.tile_images],
        )
        for i, r0 in enumerate(range(0, n, plan.tile_images))
    ]
    cap = [
        a[i % len(a)].rerank_captions.remote(m, split.tokens[c0 : c0 + plan.tile_captions])
        for i, c0 in enumerate(range(0, c, plan.tile_captions))
    ]
    iv = np.concatenate([v for _, v in ray.get(img)])
    cv = np.concatenate([v for _, v in ray.get(cap)])
    return FirstStage(iv, cv, [img, cap])


def candidates(fs_: FirstStage, k: int) -> dict[int, np.ndarray]:
    """{0: each caption's top min(k, N) images (C, Kt), 1: each image's top k captions (N, k)}."""
    iv, cv = fs_.image_vectors, fs_.caption_vectors
    return {0: top_k(cv, iv, min(k, len(iv))), 1: top_k(iv, cv, min(k, len(cv)))}


def fingerprint(base: str, k: int, cands: dict[int, np.ndarray]) -> str:
    """The exhaustive tiles' fingerprint (data, checkpoint, split, device...) with K, the
    first stage (exact inner product) and a digest of the candidates themselves."""
    h = hashlib.sha256()
    for d in (0, 1):
        h.update(np.ascontiguousarray(cands[d]).tobytes())
    return digest("exhaustive", base, "rerank", str(k), "first-stage", "exact-ip", h.hexdigest())


def compute(
    pool: tiles.Pool,
    store: RerankStore,
    fs_: FirstStage,
    m: int,
) -> dict[int, dict[str, np.ndarray]]:
    """Score every query tile ``store`` does not hold usable -> {direction: {"candidates",
    "total", "l2l", "g2l", "g2g"}} (Q, K) each, checked complete and finite."""
    plan: RerankPlan = store.plan  # type: ignore[assignment]
    cands = store.candidates
    out = {d: empty(plan, d, cands[d]) for d in (0, 1)}
    todo = []
    listed = store.listed()
    for t in plan.tiles():
        tile = store.load(*t) if t in listed else None
        if tile is None:
            todo.append(t)
        else:
            place(plan, out, t, tile)
    total, already = len(plan.tiles()), len(plan.tiles()) - len(todo)
    note = f"{already} already done" if already else ""
    progress = Progress(f"rerank model {m}", total, "tiles", start=already, note=note)

    def submit(actor: Any, t: tuple[int, int]) -> Any:
        d, c = t
        rows = plan.queries(d, c)
        queries = np.arange(rows.start, rows.stop)
        return actor.rerank_tile.remote(m, BY[DIRECTIONS[d]], queries, cands[d][rows], fs_.parts)

    with progress:
        tiles.run_tiles(
            pool,
            store,
            todo=todo,
            submit=submit,
            done=lambda t, tile: place(plan, out, t, tile),
            what=f"model {m}",
            progress=progress,
        )
    check_complete(out)
    return out


def empty(plan: RerankPlan, d: int, cands: np.ndarray) -> dict[str, np.ndarray]:
    """NaN scores: a query no tile fills is never mistaken for a scored one."""
    shape = (plan.n_queries(d), plan.k_of(d))
    return {"candidates": cands, **{k: np.full(shape, np.nan, np.float32) for k in SCORES}}


def place(plan: RerankPlan, out: dict[int, dict[str, np.ndarray]], t: tuple[int, int],
          tile: dict[str, np.ndarray]) -> None:  # fmt: skip
    d, c = t
    for k in SCORES:
        out[d][k][plan.queries(d, c)] = tile[k]


def check_complete(out: dict[int, dict[str, np.ndarray]]) -> None:
    """JobError unless every query of both directions has finite scores."""
    for d, res in out.items():
        for k in SCORES:
            bad = int((~np.isfinite(res[k])).sum())
            if bad:
                raise JobError(
                    f"the rerank is incomplete: {bad} {DIRECTIONS[d]} {k} scores are missing or "
                    "not finite; no metrics were written"
                )


def metrics(
    out: dict[int, dict[str, np.ndarray]], caption_image: np.ndarray
) -> dict[str, dict[str, float]]:
    """Recall of each score ranking the candidates (:func:`shan.metrics.sparse_recall_metrics`)."""
    return {
        k: sparse_recall_metrics(
            (out[0]["candidates"], out[0][k]), (out[1]["candidates"], out[1][k]), caption_image
        )
        for k in SCORES
    }


def exhaustive_metrics(folder: str, meta: dict[str, Any]) -> dict[str, dict[str, float]] | None:
    """The metrics of a finished exhaustive evaluation in ``folder`` of the same scorer (SHAN's
    weights; the first stage may differ), data, split, protocol and matrix as ``meta``; None
    when there is none (or not the same)."""
    path = fs.join(folder, "metrics.json")
    if not fs.exists(path):
        return None
    try:
        doc = json.loads(fs.read_bytes(path))
    except (fs.StorageError, ValueError):
        return None
    theirs = doc.get("meta", {}) if isinstance(doc, dict) else {}
    # the same scorer: SHAN's weights and keys (another first stage scores alike), or, for
    # an evaluation written before the scorer was recorded, the same model references
    model = "scorer" if "scorer" in theirs else "model"
    same = (model, "data", "split", "protocol", "images", "captions")
    if any(theirs.get(k) != meta.get(k) for k in same) or "rerank_k" in theirs:
        return None
    got = {k: doc.get(k) for k in SCORES}
    if not all(isinstance(v, dict) and set(KEYS) <= set(v) for v in got.values()):
        return None
    return {k: {m: float(v[m]) for m in KEYS} for k, v in got.items() if v is not None}


def differences(
    ours: dict[str, dict[str, float]], theirs: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """rerank - exhaustive, per score and metric."""
    return {k: {m: ours[k][m] - theirs[k][m] for m in KEYS} for k in ours}


def write_outputs(
    folder: str,
    out: dict[int, dict[str, np.ndarray]],
    *,
    files: dict[str, bytes],
    doc: dict[str, Any],
) -> list[str]:
    """The sparse arrays (:data:`SPARSE_FILES`), ``files``, then ``metrics.json`` (``doc``)
    last, in ``folder``; returns the names written."""
    from shan.eval.outputs import npy_bytes

    fs.delete_tree(fs.join(folder, "metrics.json"))
    names = []
    for d, name in enumerate(DIRECTIONS):
        fs.write_bytes(fs.join(folder, f"{name}_candidates.npy"), _npy(out[d]["candidates"]))
        for k in SCORES:
            fs.write_bytes(fs.join(folder, f"{name}_{k}.npy"), npy_bytes(out[d][k]))
        names += [f"{name}_candidates.npy", *(f"{name}_{k}.npy" for k in SCORES)]
    for name, data in files.items():
        fs.write_bytes(fs.join(folder, name), data)
        names.append(name)
    fs.write_bytes(fs.join(folder, "metrics.json"), json.dumps(doc, indent=2).encode())
    return [*names, "metrics.json"]


def _npy(a: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(a, dtype=np.int32))
    return buf.getvalue()


def format_differences(diff: dict[str, dict[str, float]]) -> str:
    """A Markdown table of rerank - exhaustive (points), one row per score."""
    head = "| rerank - exhaustive | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum |"
    lines = [head, "|" + "---|" * 8]
    for name, m in diff.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:+.2f}" for k in KEYS[:7]) + " |")
    return "\n".join(lines)
