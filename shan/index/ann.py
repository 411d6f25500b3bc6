"""The approximate nearest-neighbour part of an index: FAISS over the first-stage image
vectors (unit length, so inner product is cosine). Ids are row numbers.

Which kind (:func:`choose_kind`), measured on this project's 2-core machine with one FAISS
thread, D = 256, 50 queries, top 100: an exact scan (``IndexFlatIP``) takes 0.27 ms a query at
10 k vectors, 2.6 ms at 50 k and 11 ms at 200 k, linear in N (about 55 ms at 1 M, a quarter of
the 200 ms a query may take with its rerank); IVF with nlist = 4 sqrt(N) answers in 0.1 to
0.3 ms at those sizes but may miss neighbours. So below :data:`FLAT_MAX` vectors the index is
exact, and past it IVF with ``nprobe`` chosen at build time as the smallest that finds
:data:`TARGET_RECALL` of the exact top 10 of sample queries (HNSW on request).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

KINDS = ("auto", "flat", "ivf", "hnsw")
FLAT_MAX = 200_000  # exact search up to this many vectors (see the module's docstring)
TARGET_RECALL = 0.95  # of the exact top 10, on sample queries, when choosing nprobe
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128


def _faiss() -> Any:
    import faiss

    return faiss


def choose_kind(n: int, kind: str = "auto") -> str:
    """The index kind for ``n`` vectors: ``kind`` unless it is ``auto``, then ``flat`` up to
    :data:`FLAT_MAX` vectors and ``ivf`` past it."""
    if kind not in KINDS:
        raise ValueError(f"index kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if n <= FLAT_MAX else "ivf"


def nlist_for(n: int) -> int:
    """IVF lists for ``n`` vectors: about 4 sqrt(N), at least 1, at most N / 39 (FAISS wants
    39 training points a centroid)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def build(vectors: np.ndarray, kind: str = "auto", *, seed: int = 0) -> tuple[Any, str, dict]:
    """vectors (N, D) float32 -> (the FAISS index holding them as rows 0..N-1, its kind, its
    parameters for the card)."""
    faiss = _faiss()
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = x.shape
    kind = choose_kind(n, kind)
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return index, kind, {}
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.add(x)
        index.hnsw.efSearch = HNSW_EF_SEARCH
        return index, kind, {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION,
                             "ef_search": HNSW_EF_SEARCH}  # fmt: skip
    nlist = nlist_for(n)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = x if n <= 256 * nlist else x[np.sort(rng.choice(n, 256 * nlist, replace=False))]
    index.train(train)
    index.add(x)
    index.nprobe = choose_nprobe(index, x, rng)
    return index, kind, {"nlist": nlist, "nprobe": int(index.nprobe)}


def choose_nprobe(index: Any, x: np.ndarray, rng: np.random.Generator, queries: int = 256) -> int:
    """The smallest power-of-two ``nprobe`` whose top 10 holds :data:`TARGET_RECALL` of the
    exact top 10 for a sample of the stored vectors as queries."""
    faiss = _faiss()
    q = x[rng.choice(len(x), min(queries, len(x)), replace=False)]
    top = min(10, len(x))
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    _, want = exact.search(q, top)
    nprobe = 1
    while nprobe < index.nlist:
        index.nprobe = nprobe
        _, got = index.search(q, top)
        found = np.mean([len(set(a) & set(b)) / top for a, b in zip(want, got)])
        if found >= TARGET_RECALL:
            break
        nprobe *= 2
    return min(nprobe, index.nlist)


def search(index: Any, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """queries (Q, D) -> (rows (Q, k') int64, inner products (Q, k') float32), best first,
    k' = min(k, N)."""
    k = min(int(k), int(index.ntotal))
    q = np.ascontiguousarray(np.atleast_2d(vectors), dtype=np.float32)
    sims, rows = index.search(q, k)
    return rows.astype(np.int64), sims.astype(np.float32)


def to_bytes(index: Any) -> bytes:
    return bytes(_faiss().serialize_index(index))


def from_bytes(data: bytes) -> Any:
    return _faiss().deserialize_index(np.frombuffer(data, dtype=np.uint8))


def read(path: str) -> Any:
    return _faiss().read_index(path)


__all__ = ["FLAT_MAX", "KINDS", "build", "choose_kind", "from_bytes", "read", "search", "to_bytes"]
