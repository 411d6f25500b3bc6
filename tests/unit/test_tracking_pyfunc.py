"""The trained model as an MLflow model (``shan.tracking.pyfunc``, ``shan.serving``): an untrained
tiny checkpoint logged into a SQLite store of tmp_path, registered, loaded by
``models:/NAME@ALIAS`` in a fresh process; its signature and input example; bad requests; and
``refs.resolve`` on the MLflow-model layout and on the plain-checkpoint layout of older runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shan.checkpoint import load_model
from shan.errors import CheckpointError
from shan.model import SCORES
from shan.serving import InputError, check_request, score_request
from shan.tracking import refs
from shan.tracking.runs import using_tracking_uri
from tests.helpers import ROOT, library_scores, log_tiny_model, scoring_request


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """The tiny model, logged and registered with MLflow's global tracking URI unset and the
    working directory elsewhere: a call that fell back to the default store would miss it."""
    tmp = tmp_path_factory.mktemp("pyfunc")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(tmp_path_factory.mktemp("cwd"))
        yield log_tiny_model(tmp)


FRESH = """
import sys, numpy as np, mlflow.pyfunc
model = mlflow.pyfunc.load_model(sys.argv[1])
req = dict(np.load(sys.argv[2]))
out = model.predict(req)
np.savez(sys.argv[3], **out)
"""


def test_load_by_alias_in_a_fresh_process_scores_like_the_library(logged, tmp_path):
    req = scoring_request()
    np.savez(tmp_path / "req.npz", **req)
    # on CPU: on a GPU the model scores with bf16 autocast, not comparable at 1e-5
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    args = ["models:/shan-test@champion", str(tmp_path / "req.npz"), str(tmp_path / "out.npz")]
    subprocess.run([sys.executable, "-c", FRESH, *args], env=env, check=True, timeout=300)
    got, want = dict(np.load(tmp_path / "out.npz")), library_scores(logged["ckpt"], req)
    assert sorted(got) == sorted(SCORES)
    for key in SCORES:
        assert got[key].shape == (3, 4) and got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], want[key], atol=1e-5)


def test_the_run_keeps_running_and_shows_the_model(logged):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=logged["uri"])
    run = c.get_run(logged["run_id"])
    assert run.info.status == "RUNNING"  # logging the model neither ended nor finished it
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [
        (logged["model_uri"].removeprefix("models:/"), 2)
    ]
    model = c.get_logged_model(logged["model_uri"].removeprefix("models:/"))
    assert model.source_run_id == logged["run_id"] and model.status == "READY"
    mv = c.get_model_version_by_alias("shan-test", "champion")
    assert mv.source == logged["model_uri"] and mv.run_id == logged["run_id"]
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "shan-test", "version": "1"}]


def test_signature_input_example_and_requirements(logged, tmp_path):
    import mlflow
    from mlflow.models import Model

    with using_tracking_uri(logged["uri"]):
        info = mlflow.models.get_model_info(logged["model_uri"])
    inputs = {s.name: (s.type, s.shape) for s in info.signature.inputs.inputs}
    assert inputs == {
        "features": (np.dtype(np.float32), (-1, -1, 16)),
        "counts": (np.dtype(np.int64), (-1,)),
        "captions": (np.dtype(str), (-1,)),
    }
    outputs = {s.name: (s.type, s.shape) for s in info.signature.outputs.inputs}
    assert outputs == {k: (np.dtype(np.float32), (-1, -1)) for k in SCORES}
    with using_tracking_uri(logged["uri"]):
        path = mlflow.artifacts.download_artifacts(
            artifact_uri=logged["model_uri"], dst_path=str(tmp_path)
        )
    example = Model.load(path).load_input_example(path)
    assert example["features"].shape[2] == 16 and len(example["counts"]) == 2
    words = set(logged["vocab"].idx2word)
    assert all(set(c.split()) <= words for c in example["captions"])
    reqs = Path(path, "requirements.txt").read_text()
    assert "torch==" in reqs and "numpy==" in reqs


def test_bad_requests_name_the_field(logged):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    with using_tracking_uri(logged["uri"]):
        model = mlflow.pyfunc.load_model(logged["model_uri"])
    for field, change, message in [
        ("counts", np.array([4, 5, 1]), r"counts\[1\] = 5 is not in 1..4"),
        ("counts", np.array([4, 0, 1]), r"counts\[1\] = 0 is not in 1..4"),
        ("captions", np.array(["a dog", "  "]), r"captions\[1\] is empty"),
    ]:
        with pytest.raises(MlflowException, match=f"^{field}: {message}"):
            model.predict({**scoring_request(), field: change})
    nan = scoring_request()
    nan["features"][1, 2, 3] = np.nan
    with pytest.raises(MlflowException, match="^features: holds NaN"):
        model.predict(nan)
    with pytest.raises(MlflowException, match="features"):  # MLflow's schema check
        model.predict(scoring_request(dim=12))


def test_the_requirements_name_what_scoring_imports_the_tokenizer_included():
    from shan.tracking import pyfunc

    pins = dict(r.split("==") for r in pyfunc.pip_requirements())
    # predict tokenizes the captions with NLTK's word_tokenize (shan.vocab)
    assert {"torch", "numpy", "nltk", "mlflow"} <= set(pins), pins
    assert all(pins.values())


def test_using_tracking_uri_restores_the_environment(monkeypatch, tmp_path):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    with using_tracking_uri(f"sqlite:///{tmp_path}/x.db"):
        assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/x.db"
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"
    assert mlflow.get_tracking_uri() == "sqlite:///elsewhere.db"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"features": np.zeros((2, 3, 12), np.float32)}, r"features: expected shape \(N, R, 16\)"),
        ({"features": np.zeros((0, 3, 16), np.float32)}, r"features: .* N >= 1"),
        ({"features": np.full((3, 4, 16), np.inf, np.float32)}, "features: holds NaN or inf"),
        ({"counts": np.array([1, 2])}, r"counts: expected 3 integers"),
        ({"counts": np.array([1.0, 2.0, 1.0])}, r"counts: expected 3 integers"),
        ({"captions": np.array([], dtype=str)}, r"captions: expected a list of M >= 1"),
        (
            {"captions": np.array(["a dog", None], dtype=object)},
            r"captions: captions\[1\] is not a string",
        ),
        ({"captions": None}, r"captions: expected a list"),
    ],
)
def test_check_request(change, message):
    with pytest.raises(InputError, match=f"^{message}"):
        check_request({**scoring_request(), **change}, 16)


def test_a_missing_field():
    req = scoring_request()
    del req["counts"]
    with pytest.raises(InputError, match="^counts: missing"):
        check_request(req, 16)


def test_score_request_in_process_matches_the_library(logged):
    loaded = load_model(logged["ckpt"])
    got, want = (
        score_request(loaded, scoring_request()),
        library_scores(logged["ckpt"], scoring_request()),
    )
    for key in SCORES:
        np.testing.assert_allclose(got[key], want[key], atol=1e-6)


# -- refs.resolve on both layouts ---------------------------------------------------------------
def same_checkpoint(path: str, ckpt: Path) -> None:
    for name in ("model.pt", "config.yaml", "vocab.json"):
        assert Path(path, name).read_bytes() == (ckpt / name).read_bytes(), name


def test_resolve_the_mlflow_model_layout(logged):
    for ref in (logged["run_id"], "models:/shan-test@champion", "models:/shan-test/1"):
        m = refs.resolve(ref, logged["uri"])
        try:
            same_checkpoint(m.path, logged["ckpt"])
            assert Path(m.path).parent.name == "artifacts" and m.train_run_id == logged["run_id"]
        finally:
            refs.cleanup([m])
        assert not Path(m.path).exists()


def test_a_downloaded_mlflow_model_folder_resolves_to_its_checkpoint(logged, tmp_path):
    m = refs.resolve("models:/shan-test/1", logged["uri"])
    try:
        folder = Path(m.path).parent.parent  # MLmodel + artifacts/checkpoint
        assert (folder / "MLmodel").is_file()
        mine = shutil.copytree(folder, tmp_path / "downloaded")
    finally:
        refs.cleanup([m])
    local = refs.resolve(str(mine))
    same_checkpoint(local.path, logged["ckpt"])
    assert local.temp is None and Path(local.path).is_relative_to(mine)


def test_resolve_the_plain_checkpoint_layout(logged):
    from mlflow.tracking import MlflowClient

    from tests.helpers import register_checkpoint

    c = MlflowClient(tracking_uri=logged["uri"])
    run_id = c.create_run(logged["exp"]).info.run_id
    c.log_artifacts(run_id, str(logged["ckpt"]), artifact_path="checkpoint")
    assert str(register_checkpoint(c, run_id, "shan-test")) == "2"
    for ref in (run_id, "models:/shan-test/2"):
        m = refs.resolve(ref, logged["uri"])
        try:
            same_checkpoint(m.path, logged["ckpt"])
            assert m.train_run_id == run_id
        finally:
            refs.cleanup([m])


def test_checkpoint_in_refuses_a_foreign_mlflow_model(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors: {python_function: {loader_module: x}}\n")
    with pytest.raises(CheckpointError, match="an MLflow model without a SHAN checkpoint"):
        refs.checkpoint_in(tmp_path, "models:/other/1")
    (tmp_path / "MLmodel").unlink()
    with pytest.raises(CheckpointError, match="no model.pt and no MLmodel"):
        refs.checkpoint_in(tmp_path)
