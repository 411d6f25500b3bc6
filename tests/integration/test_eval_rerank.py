"""``shan evaluate --rerank K`` on a real local Ray instance (2 actors): with K the whole split
it is the exhaustive evaluation, and a killed rerank resumes from its stored tiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shan.data.format import load_vocab
from shan.eval.job import EvalOptions, evaluate
from shan.metrics import SCORES
from tests.helpers import ROOT, save_untrained

N_IMAGES, N_CAPTIONS = 60, 300  # synthetic_small's test split


@pytest.fixture(scope="module")
def with_head(synthetic_small, tmp_path_factory) -> Path:
    """A freshly initialised tiny SHAN with an 8-d first stage."""
    folder = tmp_path_factory.mktemp("rerank-ckpt") / "ckpt"
    vocab = load_vocab(synthetic_small)
    return save_untrained(folder, vocab, overrides=("model.first_stage_dim=8",))


def opts(**kw) -> EvalOptions:
    base = dict(split="test", tile_images=16, tile_captions=64, actors=2, cpus_per_actor=0.5)
    return EvalOptions(**{**base, **kw})


def sparse(folder: Path) -> dict[str, np.ndarray]:
    names = [f"{d}_{k}" for d in ("t2i", "i2t") for k in ("candidates", *SCORES)]
    return {n: np.load(folder / f"{n}.npy") for n in names}


def another_head(ckpt: Path, folder: Path) -> Path:
    """A copy of ``ckpt`` with other first-stage weights (what ``shan index head`` writes):
    another checkpoint, the same scorer."""
    from shan.checkpoint import load_checkpoint, save_checkpoint

    c = load_checkpoint(ckpt)
    g = torch.Generator().manual_seed(7)
    for name, w in c.weights.items():
        if name.startswith("first_stage."):
            c.weights[name] = torch.randn(w.shape, generator=g, dtype=w.dtype)
    return save_checkpoint(folder, c)


@pytest.fixture(scope="module")
def whole(ray_client, synthetic_small, with_head, tmp_path_factory):
    """(out, exhaustive result, rerank result, the copy's folder): the model evaluated
    exhaustively, then a copy with another first stage (as ``shan index head`` writes) with
    K = every caption (every image for t2i) into the same --out, compared with the exhaustive
    one though it is another checkpoint."""
    out = tmp_path_factory.mktemp("rerank") / "out"
    quiet = lambda s: None  # noqa: E731
    exhaustive = evaluate([str(with_head)], synthetic_small, str(out), opts(), log=quiet)
    refit = str(another_head(with_head, tmp_path_factory.mktemp("refit") / "ckpt"))
    reranked = evaluate(
        [refit], synthetic_small, str(out), opts(rerank=N_CAPTIONS, compare=str(out)), log=quiet
    )
    return out, exhaustive, reranked, refit


def test_rerank_with_k_the_whole_split_is_the_exhaustive_ranking(whole):
    out, exhaustive, reranked, _ = whole
    got = sparse(out / "rerank")
    assert got["t2i_candidates"].shape == (N_CAPTIONS, N_IMAGES)  # K capped at the images
    assert got["i2t_candidates"].shape == (N_IMAGES, N_CAPTIONS)
    assert got["t2i_candidates"].dtype == np.int32 and got["t2i_total"].dtype == np.float32
    for k in SCORES:  # the sparse scores are the matrix's entries, and rank the same
        dense = np.load(out / f"sims_{k}.npy")
        t2i = dense.T[np.arange(N_CAPTIONS)[:, None], got["t2i_candidates"]]
        i2t = dense[np.arange(N_IMAGES)[:, None], got["i2t_candidates"]]
        np.testing.assert_allclose(got[f"t2i_{k}"], t2i, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got[f"i2t_{k}"], i2t, rtol=0, atol=1e-5)
    doc = json.loads((out / "rerank" / "metrics.json").read_text())
    assert doc["meta"]["rerank_k"] == N_CAPTIONS
    # the ranking (by the total score) is exactly the exhaustive one: every rank the same. (A
    # step score alone may hold exact ties in the matrix that float rounding in other blocks
    # splits: its entries agree to 1e-5 above, its ranks are not compared.)
    assert reranked.metrics["total"] == exhaustive.metrics["total"]
    assert doc["vs_exhaustive"]["total"] == {m: 0.0 for m in exhaustive.metrics["total"]}
    assert set(doc["vs_exhaustive"]) == set(SCORES)
    assert (out / "metrics.json").exists()  # the exhaustive evaluation's outputs stay
    assert "| rerank - exhaustive |" in reranked.table


def test_a_killed_rerank_resumes_from_its_tiles(synthetic_small, whole, tmp_path):
    out, refit = tmp_path / "out", whole[3]
    cmd = [
        sys.executable, str(ROOT / "jobs/evaluate.py"), "--model", refit,
        "--data", synthetic_small, "--out", str(out), "--rerank", "20", "--tile-images", "16",
        "--tile-captions", "64", "--actors", "2", "--cpus-per-actor", "0.5", "--no-mlflow",
    ]  # fmt: skip
    killed = [sys.executable, "-m", "tests.integration.killed_evaluation", "3", *cmd[2:]]
    first = subprocess.run(killed, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert first.returncode == 137, first.stderr[-2000:]
    assert not (out / "rerank" / "metrics.json").exists()  # nothing reported
    assert len(list((out / "rerank" / "tiles" / "model-0").glob("tile-*.npz"))) == 3
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert ", 3 already done)" in second.stderr
    # K = 20's candidates are the first 20 of K = all's (the same first stage, best first)
    got, full = sparse(out / "rerank"), sparse(whole[0] / "rerank")
    assert (got["i2t_candidates"] == full["i2t_candidates"][:, :20]).all()
    assert (got["t2i_candidates"] == full["t2i_candidates"][:, :20]).all()
    for name in ("t2i_total", "i2t_total", "i2t_l2l"):
        np.testing.assert_allclose(got[name], full[name][:, :20], rtol=0, atol=1e-5)
    doc = json.loads((out / "rerank" / "metrics.json").read_text())
    assert "vs_exhaustive" not in doc and doc["meta"]["rerank_k"] == 20


def test_a_rerank_is_logged_to_mlflow_with_its_k(services, whole):
    from mlflow.tracking import MlflowClient

    from shan.eval.record import log_evaluation

    out, _, reranked, _ = whole
    rid = log_evaluation(reranked, str(out), opts(rerank=N_CAPTIONS, experiment="shan-rerank"))
    run = MlflowClient().get_run(rid)
    assert run.data.params["rerank_k"] == str(N_CAPTIONS)
    assert run.data.metrics["test/rsum"] == pytest.approx(reranked.rsum)
    assert run.data.metrics["test/vs_exhaustive/rsum"] == 0.0
    logged = {a.path for a in MlflowClient().list_artifacts(rid)}
    assert {"t2i_candidates.npy", "i2t_total.npy", "metrics.json"} <= logged
