"""FAISS behind the index (``shan.index.ann``): the kind by size, exact rows from a flat index,
and IVF/HNSW finding the rows a flat index finds."""

from __future__ import annotations

import numpy as np
import pytest

from shan.index import ann


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n=3000, dim=16, centers=30, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centers, dim))
    return _unit(c[rng.integers(0, centers, n)] + 0.3 * rng.normal(size=(n, dim)))


def test_the_kind_follows_the_size():
    assert ann.choose_kind(10) == "flat"
    assert ann.choose_kind(ann.FLAT_MAX) == "flat"
    assert ann.choose_kind(ann.FLAT_MAX + 1) == "ivf"
    assert ann.choose_kind(10, "hnsw") == "hnsw"
    with pytest.raises(ValueError, match="not one of"):
        ann.choose_kind(10, "pq")


def test_flat_returns_the_exact_rows():
    x = _clustered(500)
    q = _unit(np.random.default_rng(1).normal(size=(7, 16)))
    index, kind, params = ann.build(x, "flat")
    rows, sims = ann.search(index, q, 5)
    want = np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :5]
    assert kind == "flat" and params == {}
    assert rows.dtype == np.int64 and rows.shape == (7, 5)
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(sims, np.take_along_axis(q @ x.T, want, 1), rtol=1e-5)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_find_what_flat_finds(kind):
    x = _clustered()
    flat, _, _ = ann.build(x, "flat")
    index, got_kind, params = ann.build(x, kind)
    assert got_kind == kind
    if kind == "ivf":
        assert params["nlist"] == ann.nlist_for(len(x)) and 1 <= params["nprobe"] <= params["nlist"]
    rows, _ = ann.search(index, x[:50], 1)
    np.testing.assert_array_equal(rows[:, 0], np.arange(50))  # each stored vector finds itself
    q = x[100:300]
    exact, _ = ann.search(flat, q, 10)
    approx, _ = ann.search(index, q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, approx)])
    assert recall >= 0.9


def test_k_past_n_is_cut_and_bytes_round_trip():
    x = _clustered(20)
    index, _, _ = ann.build(x)
    rows, _ = ann.search(ann.from_bytes(ann.to_bytes(index)), x[:2], 50)
    assert rows.shape == (2, 20) and sorted(rows[0]) == list(range(20))
