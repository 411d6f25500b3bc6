"""The rerank evaluation's parts that need no Ray: its options, K's checks, the exact top K,
the store of query tiles (resumable, fingerprinted, candidates checked) and its outputs."""

from __future__ import annotations

import numpy as np
import pytest

from shan.eval import outputs, rerank
from shan.eval.job import EvalOptions
from shan.eval.rerank import RerankPlan, RerankStore, top_k
from shan.metrics import SCORES


def test_options_refuse_a_bad_k():
    assert EvalOptions(rerank=10).problems() == []
    for k in (0, -5, 9, 2.5):
        (line,) = EvalOptions(rerank=k).problems()  # type: ignore[arg-type]
        assert line.startswith("rerank must be an integer >= 10") and str(k) in line
    assert "coco-1k" in EvalOptions(rerank=50, protocol="coco-1k").problems()[0]
    assert "give rerank" in EvalOptions(compare="x").problems()[0]


def test_k_larger_than_the_split_is_refused():
    assert rerank.check_k(500, 100, 500) is None
    assert "larger than the split (100 images x 500 captions)" in str(rerank.check_k(501, 100, 500))
    assert "at least 10" in str(rerank.check_k(5, 100, 500))


def test_top_k_is_the_exact_inner_product_order():
    rng = np.random.default_rng(0)
    q, items = rng.normal(size=(37, 8)), rng.normal(size=(50, 8))
    got = top_k(q, items, 10, chunk=16)
    want = np.argsort(-(q @ items.T), axis=1, kind="stable")[:, :10]
    assert got.dtype == np.int32 and (got == want).all()
    full = top_k(q, items, 50)  # K = N: every item, best first
    assert (np.sort(full, axis=1) == np.arange(50)).all()
    assert (full == np.argsort(-(q @ items.T), axis=1, kind="stable")).all()


def _plan(fp: str = "fp") -> RerankPlan:
    return RerankPlan(n_images=7, n_captions=20, k=12, tile_images=3, tile_captions=8,
                      fingerprint=fp)  # fmt: skip


def _cands(seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        0: np.stack([rng.permutation(7) for _ in range(20)]).astype(np.int32),  # min(12, 7)
        1: np.stack([rng.permutation(20)[:12] for _ in range(7)]).astype(np.int32),
    }


def _tile(plan: RerankPlan, cands, d: int, c: int) -> dict[str, np.ndarray]:
    rows = cands[d][plan.queries(d, c)]
    return {"candidates": rows, **{k: rows.astype(np.float32) / 10 for k in SCORES}}


def test_the_plan_covers_every_query_once():
    plan = _plan()
    assert plan.tiles() == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert (plan.k_of(0), plan.k_of(1)) == (7, 12)
    for d in (0, 1):
        covered = np.concatenate(
            [np.arange(20)[plan.queries(d, c)] for dd, c in plan.tiles() if dd == d]
        )
        assert covered.tolist() == list(range(plan.n_queries(d)))


def test_the_store_resumes_and_never_uses_a_tile_of_other_candidates(tmp_path):
    plan, cands, lines = _plan(), _cands(), []
    store = RerankStore(str(tmp_path), plan, cands, log=lines.append)
    for t in [(0, 0), (1, 2)]:
        store.save(*t, _tile(plan, cands, *t))
    again = RerankStore(str(tmp_path), plan, cands, log=lines.append)  # a rerun: same plan
    assert again.listed() == {(0, 0), (1, 2)} and lines == []
    got = again.load(0, 0)
    assert got is not None and (got["candidates"] == cands[0][:8]).all()
    other = _cands(seed=1)  # the same plan, other candidates in a tile: recomputed, not used
    assert RerankStore(str(tmp_path), plan, other, log=lines.append).load(0, 0) is None
    assert "not this evaluation's" in lines[-1]
    with pytest.raises(Exception, match="not saved"):
        store.save(0, 1, _tile(plan, other, 0, 1))
    RerankStore(str(tmp_path), _plan("another K"), cands, log=lines.append)  # other fingerprint
    assert "tiles of another evaluation" in lines[-1] and not list(tmp_path.glob("tile-*"))


def test_an_unfinished_rerank_reports_nothing():
    plan, cands = _plan(), _cands()
    out = {d: rerank.empty(plan, d, cands[d]) for d in (0, 1)}
    for t in plan.tiles()[:-1]:
        rerank.place(plan, out, t, _tile(plan, cands, *t))
    with pytest.raises(Exception, match="incomplete: 12 i2t total"):
        rerank.check_complete(out)
    rerank.place(plan, out, plan.tiles()[-1], _tile(plan, cands, *plan.tiles()[-1]))
    rerank.check_complete(out)


def test_the_rerank_folder_is_an_evaluations_own(tmp_path):
    files = ["rerank/t2i_candidates.npy", "rerank/i2t_g2l.npy", "rerank/metrics.json",
             "rerank/tiles/model-0/plan.json", "rerank/tiles/model-0/tile-r00001-c00002.npz",
             "sims_total.npy", "metrics.json"]  # fmt: skip
    for f in files:
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_bytes(b"x")
    assert outputs.foreign_entries(str(tmp_path)) == []
    (tmp_path / "rerank" / "notes.txt").write_text("mine")
    assert outputs.foreign_entries(str(tmp_path)) == ["rerank/notes.txt"]


def test_differences_and_their_table():
    ours = {k: {m: 1.0 for m in rerank.KEYS} for k in SCORES}
    theirs = {k: {m: 1.5 for m in rerank.KEYS} for k in SCORES}
    diff = rerank.differences(ours, theirs)
    assert diff["total"]["rsum"] == -0.5
    assert "| total | -0.50 |" in rerank.format_differences(diff)


def test_only_the_same_exhaustive_evaluation_is_compared_with(tmp_path):
    import json

    meta = {"model": ["m"], "data": "d", "split": "test", "protocol": "plain", "images": 7,
            "captions": 35}  # fmt: skip
    metrics = {k: {m: 1.0 for m in rerank.KEYS} for k in SCORES}
    assert rerank.exhaustive_metrics(str(tmp_path), meta) is None  # nothing there
    (tmp_path / "metrics.json").write_text(json.dumps({**metrics, "meta": {**meta, "s": 1}}))
    assert rerank.exhaustive_metrics(str(tmp_path), meta) == metrics
    for other in ({"model": ["n"]}, {"split": "dev"}, {"captions": 30}, {"rerank_k": 10}):
        doc = {**metrics, "meta": {**meta, **other}}
        (tmp_path / "metrics.json").write_text(json.dumps(doc))
        assert rerank.exhaustive_metrics(str(tmp_path), meta) is None, other
    (tmp_path / "metrics.json").write_text("{not json")
    assert rerank.exhaustive_metrics(str(tmp_path), meta) is None


def test_an_exhaustive_evaluation_of_the_same_scorer_is_compared_with(tmp_path):
    """``shan index head`` writes another checkpoint (another reference) that scores alike:
    the same scorer digest is enough; another digest is not."""
    import json

    meta = {"model": ["ckpt-head"], "scorer": ["s1"], "data": "d", "split": "test",
            "protocol": "plain", "images": 7, "captions": 35}  # fmt: skip
    metrics = {k: {m: 1.0 for m in rerank.KEYS} for k in SCORES}
    doc = {**metrics, "meta": {**meta, "model": ["ckpt"]}}
    (tmp_path / "metrics.json").write_text(json.dumps(doc))
    assert rerank.exhaustive_metrics(str(tmp_path), meta) == metrics
    doc["meta"]["scorer"] = ["s2"]
    (tmp_path / "metrics.json").write_text(json.dumps(doc))
    assert rerank.exhaustive_metrics(str(tmp_path), meta) is None
