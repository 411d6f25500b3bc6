"""The evaluation job on a real local Ray instance (2 actors) and a real MLflow server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from shan.checkpoint import Checkpoint, save_checkpoint
from shan.config import load_config
from shan.data.format import load_vocab
from shan.data.reader import ExampleStream, read_split
from shan.errors import CheckpointError, ConfigError, JobError
from shan.eval import tiles
from shan.eval.job import EvalOptions, EvalResult, evaluate
from shan.eval.record import log_evaluation
from shan.loss import TripletLoss
from shan.metrics import recall_metrics
from shan.model import SCORES, SHAN
from shan.promotion import promote
from shan.scoring import score_matrix
from tests.helpers import ROOT, TINY
from tests.integration.killed_evaluation import saving_then


def make_checkpoint(root: str, folder: Path, steps: int, seed: int = 0) -> Path:
    """A tiny SHAN trained ``steps`` steps in-process (0: untrained), saved as a checkpoint."""
    cfg = load_config(TINY, [f"seed={seed}"])
    vocab = load_vocab(root)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(cfg.model, len(vocab))
    if steps:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny steps: a second thread waiting for a busy core costs
        data = read_split(root, "train")
        rows = [
            {
                "features": data.features,
                "num_regions": data.num_regions,
                "image_id": data.image_ids,
                "tokens": [
                    [data.tokens[j] for j in np.flatnonzero(data.caption_image == i)]
                    for i in range(len(data.image_ids))
                ],
            }
        ]
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        loss_fn, done = TripletLoss(cfg.loss), 0
        while done < steps:
            for b in ExampleStream(32, 64, seed=done)(rows):
                out = model(b.features.float(), b.num_regions, b.tokens, b.lengths, block=32)
                loss = loss_fn(out, b.image_ids)
                opt.zero_grad()
                loss.backward()
                opt.step()
                done += 1
                if done == steps:
                    break
        torch.set_num_threads(threads)
    save_checkpoint(
        folder, Checkpoint(weights=model.state_dict(), config=cfg, vocab=vocab, step=steps)
    )
    return folder


@pytest.fixture(scope="module")
def checkpoints(synthetic_small, tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {
        "good": make_checkpoint(synthetic_small, d / "good", steps=300),
        "bad": make_checkpoint(synthetic_small, d / "bad", steps=0, seed=7),
    }


def opts(**kw) -> EvalOptions:
    base = dict(split="test", tile_images=16, tile_captions=64, actors=2, cpus_per_actor=0.5)
    base.update(kw)
    return EvalOptions(**base)


def load_out(out: Path) -> dict:
    return {k: np.load(out / f"sims_{k}.npy") for k in SCORES}


@pytest.fixture(scope="module")
def evaluated(ray_client, synthetic_small, checkpoints, tmp_path_factory):
    """(out, result): the good checkpoint evaluated once with :func:`opts`, undisturbed; the
    matrices the tests that disturb an evaluation compare theirs with."""
    out = tmp_path_factory.mktemp("evaluated") / "out"
    result = evaluate([str(checkpoints["good"])], synthetic_small, str(out), opts(),
                      log=lambda s: None)  # fmt: skip
    return out, result


def test_tiled_matrix_equals_library_and_metrics_are_consistent(
    synthetic_small, checkpoints, evaluated
):
    from shan.checkpoint import load_model

    out, result = evaluated
    sims = load_out(out)
    data = read_split(synthetic_small, "test")
    model = load_model(checkpoints["good"]).model
    ref = score_matrix(model, data.features, data.num_regions, data.tokens, torch.device("cpu"))
    for k in SCORES:
        assert sims[k].shape == (60, 300)
        np.testing.assert_allclose(sims[k], ref[k], rtol=0, atol=1e-5)
    # metrics.json from an independent computation on the saved matrices and index.json
    index = json.loads((out / "index.json").read_text())
    row = {iid: r for r, iid in enumerate(index["image_ids"])}
    cap_rows = np.array([row[i] for i in index["caption_image_ids"]])
    metrics = json.loads((out / "metrics.json").read_text())
    for k in SCORES:
        expected = recall_metrics(sims[k], cap_rows)
        assert metrics[k] == pytest.approx(expected)
        assert set(metrics[k]) == set(expected)
    assert metrics["total"]["rsum"] > 120  # trained: chance is about 53 of 600 here
    # what evaluate() returns is what it wrote
    assert isinstance(result, EvalResult) and result.rsum == metrics["total"]["rsum"]
    assert {k: result.metrics[k] for k in SCORES} == {k: metrics[k] for k in SCORES}
    assert result.doc["meta"] == metrics["meta"] and "| total |" in result.table
    assert {"metrics.json", "index.json", "recall.md", *(f"sims_{k}.npy" for k in SCORES)} <= set(
        result.names
    )
    assert [m.ref for m in result.models] == [str(checkpoints["good"])]
    for name in ("recall.md", "recall_at_k.png", "attention_0.png"):
        assert (out / name).stat().st_size > 0


def test_killing_an_actor_mid_run_gives_the_same_matrix(
    synthetic_small, checkpoints, evaluated, tmp_path
):
    import ray.util.state

    clean, _ = evaluated
    killed = []

    def kill_one() -> None:
        actors = [
            a
            for a in ray.util.state.list_actors(filters=[("state", "=", "ALIVE")])
            if a.class_name == "TileScorer"
        ]
        os.kill(actors[0].pid, signal.SIGKILL)
        killed.append(actors[0].pid)

    hit = tmp_path / "hit"
    with pytest.MonkeyPatch.context() as mp:  # after the second tile saved
        mp.setattr(tiles.TileStore, "save", saving_then(2, kill_one))
        evaluate([str(checkpoints["good"])], synthetic_small, str(hit), opts(), log=lambda s: None)
    assert killed
    a, b = load_out(clean), load_out(hit)
    for k in SCORES:
        np.testing.assert_array_equal(a[k], b[k])


def test_killed_job_rerun_skips_finished_tiles(synthetic_small, checkpoints, evaluated, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "jobs/evaluate.py"),
        "--model",
        str(checkpoints["good"]),
        "--data",
        synthetic_small,
        "--out",
        str(out),
        "--tile-images",
        "16",
        "--tile-captions",
        "64",
        "--actors",
        "2",
        "--cpus-per-actor",
        "0.5",
        "--no-mlflow",
    ]
    killed = [sys.executable, "-m", "tests.integration.killed_evaluation", "5", *cmd[2:]]
    first = subprocess.run(killed, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert first.returncode == 137, first.stderr[-2000:]
    assert not (out / "metrics.json").exists()
    finished = sorted((out / "tiles" / "model-0").glob("tile-*.npz"))
    assert len(finished) >= 5
    finished[0].write_bytes(finished[0].read_bytes()[:100])  # a damaged tile is redone
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert ", 4 already done)" in second.stderr or ", 5 already done)" in second.stderr
    assert f"{finished[0]}: unreadable" in second.stdout
    a, b = load_out(out), load_out(evaluated[0])  # the same options, in one go
    for k in SCORES:
        np.testing.assert_array_equal(a[k], b[k])


def test_ensemble_of_one_model_twice_equals_the_model(
    synthetic_small, checkpoints, evaluated, tmp_path
):
    good = str(checkpoints["good"])
    evaluate([good, good], synthetic_small, str(tmp_path / "two"), opts(), log=lambda s: None)
    np.testing.assert_allclose(
        load_out(evaluated[0])["total"], load_out(tmp_path / "two")["total"], atol=1e-6
    )


def test_bad_inputs_are_clear_errors_without_metrics(synthetic_small, checkpoints, tmp_path):
    from shan.data.synthetic import generate_synthetic

    out = tmp_path / "out"
    good = str(checkpoints["good"])
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        evaluate([str(tmp_path / "missing")], synthetic_small, str(out), opts())
    with pytest.raises(JobError, match="no split 'nope'"):
        evaluate([good], synthetic_small, str(out), opts(split="nope"))
    with pytest.raises(ConfigError, match="unknown protocol 'coco-2k'"):
        evaluate([good], synthetic_small, str(out), opts(protocol="coco-2k"))
    with pytest.raises(JobError, match="protocol coco-5k needs 5000 images"):
        evaluate([good], synthetic_small, str(out), opts(protocol="coco-5k"))
    other = tmp_path / "other"
    generate_synthetic(
        str(other),
        images={"test": 10},
        regions=6,
        feature_dim=16,
        concepts=40,
        seed=5,
        log=lambda s: None,
    )
    with pytest.raises(CheckpointError, match="vocabulary"):
        evaluate([good], str(other), str(out), opts())
    wide = tmp_path / "wide"
    generate_synthetic(
        str(wide), images={"test": 10}, regions=6, feature_dim=24, concepts=30, log=lambda s: None
    )
    with pytest.raises(CheckpointError, match="16-d features"):
        evaluate([good], str(wide), str(out), opts())
    assert not (out / "metrics.json").exists()  # the command line's: test_bad_inputs_eval


def test_scheduled_promotion_against_mlflow(
    services, ray_client, synthetic_small, checkpoints, tmp_path
):
    from mlflow.tracking import MlflowClient

    from tests.helpers import register_checkpoint

    c = MlflowClient()
    exp = c.get_experiment_by_name("shan-tests") or c.get_experiment(
        c.create_experiment("shan-tests")
    )
    name = "shan-promotion-test"

    def register(which: str) -> str:
        run = c.create_run(exp.experiment_id, run_name=f"train-{which}")
        c.log_artifacts(run.info.run_id, str(checkpoints[which]), artifact_path="checkpoint")
        c.set_terminated(run.info.run_id)
        version = register_checkpoint(c, run.info.run_id, name)
        c.set_registered_model_alias(name, "candidate", version)
        return version

    o = opts(split="dev")
    calls = []

    def run_eval(ref: str) -> tuple[float, str]:
        calls.append(ref)
        where = str(tmp_path / ref.rsplit("/", 1)[1])
        result = evaluate([ref], synthetic_small, where, o, log=lambda s: None)
        return result.rsum, log_evaluation(result, where, o)

    dev = ("dev", "plain")
    cand = f"models:/{name}@candidate"
    v_bad = register("bad")
    first = promote(cand, "champion", run_eval, dev, log=lambda s: None)
    assert first["decision"] == "promoted"  # no champion yet
    n_calls = len(calls)
    held = promote(cand, "champion", run_eval, ("test", "plain"), log=lambda s: None)
    assert held["decision"] == "unchanged" and len(calls) == n_calls  # it holds the alias
    v_good = register("good")
    second = promote(cand, "champion", run_eval, dev, log=lambda s: None)
    assert second["decision"] == "promoted" and second["previous_version"] == v_bad
    assert c.get_model_version_by_alias(name, "champion").version == v_good
    register("bad")
    third = promote(cand, "champion", run_eval, dev, log=lambda s: None)
    assert third["decision"] == "kept"
    assert c.get_model_version_by_alias(name, "champion").version == v_good
    n_calls = len(calls)
    again = promote(cand, "champion", run_eval, dev, log=lambda s: None)
    assert again["decision"] == "skipped" and len(calls) == n_calls
    # the decision is recorded on the evaluation run
    runs = c.search_runs(
        [c.get_experiment_by_name("shan-eval").experiment_id],
        filter_string="tags.`shan.promotion` = 'kept'",
    )
    assert runs and runs[0].data.tags["shan.model_name"] == name
    # its description links the model's version and training run; the data set is its input
    note = runs[0].data.tags["mlflow.note.content"]
    version = runs[0].data.tags["shan.model_version"]
    assert f"(#/models/{name}/versions/{version})" in note, note
    train_run = c.get_model_version(name, version).run_id
    assert f"(#/experiments/{exp.experiment_id}/runs/{train_run})" in note
    assert runs[0].data.tags["mlflow.project.entryPoint"] == "evaluate"
    [given] = c.get_run(runs[0].info.run_id).inputs.dataset_inputs
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "evaluation")]


def write_test_split(root: Path, seed: int, images: int = 20) -> None:
    """A synthetic test split whose captions (and so vocabulary and caption order) do not depend
    on ``seed``: only the image features do. The case where tiles were silently reused."""
    from shan.data.format import DatasetCard
    from shan.data.synthetic import SyntheticWorld
    from shan.data.writer import DatasetWriter

    world = SyntheticWorld(16, 30, 0)
    feats, boxes, caps = world.sample([[0, 0, r] for r in range(images)], 6, 5)
    feats += np.random.default_rng(seed).normal(0, 0.5, feats.shape).astype(np.float32)
    card = DatasetCard(name="synthetic", regions=6, feature_dim=16, has_boxes=True)
    with DatasetWriter(str(root), card, world.vocabulary()) as out:
        out.split("test").write(np.arange(images), feats, caps, boxes=boxes)


def test_a_changed_data_set_at_the_same_path_is_never_scored_from_old_tiles(ray_client, tmp_path):
    data, out, fresh = tmp_path / "data", tmp_path / "out", tmp_path / "fresh"
    write_test_split(data, seed=1)
    ck = make_checkpoint(str(data), tmp_path / "ck", steps=0)
    o = opts(tile_images=8, tile_captions=40)
    evaluate([str(ck)], str(data), str(out), o, log=lambda s: None)
    old = load_out(out)
    shutil.rmtree(data)  # the writer refuses a folder that holds a data set
    write_test_split(data, seed=2)  # same path, same captions, other features
    lines = []
    evaluate([str(ck)], str(data), str(out), o, log=lines.append)
    assert any("tiles of another evaluation; recomputing" in line for line in lines)
    evaluate([str(ck)], str(data), str(fresh), o, log=lambda s: None)
    new, expected = load_out(out), load_out(fresh)
    for k in SCORES:
        np.testing.assert_array_equal(new[k], expected[k])
        assert not np.allclose(new[k], old[k])
    m_new, m_fresh = (json.loads((d / "metrics.json").read_text()) for d in (out, fresh))
    assert {k: m_new[k] for k in SCORES} == {k: m_fresh[k] for k in SCORES}
