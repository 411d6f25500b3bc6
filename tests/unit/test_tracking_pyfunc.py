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
    # untyped: MLflow would convert typed JSON before the model checks it (1.5 -> 1)
    assert inputs == {k: (np.dtype(object), (-1,)) for k in ("features", "counts", "captions")}
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
    with pytest.raises(MlflowException, match="^features: expected shape"):
        model.predict(scoring_request(dim=12))


def as_json(req: dict) -> dict:
    """``req`` as MLflow's scoring server passes JSON on: object arrays of Python values."""
    return {k: np.array(np.asarray(v).tolist(), dtype=object) for k, v in req.items()}


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("counts", [4, 1.5, 1], "counts: expected 3 integers (one per image), got a float"),
        ("counts", [4, True, 1], "counts: expected 3 integers (one per image), got a bool"),
        ("counts", [4, "2", 1], "counts: expected 3 integers (one per image), got a str"),
        ("counts", [4, 2**70, 1], "counts: holds an integer too large"),
        ("captions", [{"a": 1}, "a dog"], "captions: captions[0] is not a string (dict)"),
        ("captions", ["a dog", 7], "captions: captions[1] is not a string (int)"),
    ],
)
def test_types_are_strict_as_json_arrives(logged, field, value, message):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    with using_tracking_uri(logged["uri"]):
        model = mlflow.pyfunc.load_model(logged["model_uri"])
    req = as_json(scoring_request())
    req[field] = np.array(value, dtype=object)
    with pytest.raises(MlflowException) as e:
        model.predict(req)
    assert e.value.message == message and e.value.get_http_status_code() == 400


@pytest.mark.parametrize(("bad", "name"), [("1.5", "str"), (True, "bool"), (None, "NoneType")])
def test_features_must_be_numbers(bad, name):
    req = as_json(scoring_request())
    req["features"][1, 2, 3] = bad
    with pytest.raises(
        InputError, match=f"^features: expected numbers, got a value of type {name}"
    ):
        check_request(req, 16)
    check_request(as_json(scoring_request()), 16)  # ints and floats as JSON gives them


def test_the_scores_a_request_may_ask_for_are_limited(monkeypatch):
    req = scoring_request()  # 3 images x 4 captions
    monkeypatch.setenv("SHAN_SERVE_MAX_SCORES", "12")
    check_request(req, 16)
    monkeypatch.setenv("SHAN_SERVE_MAX_SCORES", "11")
    with pytest.raises(InputError) as e:
        check_request(req, 16)
    assert str(e.value) == (
        "captions: 4 captions x 3 images ask for 12 scores, over the limit of 11 a request may "
        "ask for (SHAN_SERVE_MAX_SCORES)"
    )
    monkeypatch.setenv("SHAN_SERVE_MAX_FEATURES", "191")  # 3 x 4 x 16 = 192
    with pytest.raises(InputError, match=r"^features: 192 values .* limit of 191 .*MAX_FEATURES"):
        check_request(req, 16)
    monkeypatch.setenv("SHAN_SERVE_MAX_FEATURES", "lots")
    with pytest.raises(ValueError, match="SHAN_SERVE_MAX_FEATURES: expected a positive whole"):
        check_request(req, 16)


def test_the_default_limit_refuses_100000_by_100000_before_allocating(monkeypatch):
    monkeypatch.delenv("SHAN_SERVE_MAX_SCORES", raising=False)
    req = {
        "features": np.zeros((100_000, 1, 16), np.float32),
        "counts": np.ones(100_000, np.int64),
        "captions": np.array(["a dog"] * 100_000),
    }
    with pytest.raises(InputError, match=r"^captions: .* 10000000000 scores, over the limit of "):
        check_request(req, 16)


def test_a_scoring_failure_is_a_message_without_traceback(logged, monkeypatch):
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    import shan.serving

    def boom(*args, **kwargs):
        raise MemoryError("cannot allocate 37 GB")

    with using_tracking_uri(logged["uri"]):
        model = mlflow.pyfunc.load_model(logged["model_uri"])
    monkeypatch.setattr(shan.serving, "score_request", boom)
    with pytest.raises(MlflowException) as e:
        model.predict(scoring_request())
    body = json.loads(e.value.serialize_as_json())
    assert body["message"] == "scoring failed: MemoryError: cannot allocate 37 GB"
    assert "stack_trace" not in body and "Traceback" not in e.value.serialize_as_json()


def test_mlflow_does_not_warn_about_the_predict_type_hints():
    code = "import warnings; warnings.simplefilter('always'); import shan.tracking.pyfunc"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True)  # fmt: skip
    assert "type hint" not in out.stderr.lower(), out.stderr


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
        ({"counts": np.array([1.5, 2.0, 1.0])}, r"counts: expected 3 integers"),
        ({"features": np.zeros((3, 4, 16), bool)}, r"features: expected float32 numbers"),
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


@pytest.mark.parametrize(
    "form",
    [
        "{run}",
        "runs:/{run}",
        "runs:/{run}/",
        "runs:/{run}/model",
        "{model_uri}",
        "models:/shan-test@champion",
        "models:/shan-test/1",
    ],
)
def test_every_uri_a_user_pastes_resolves_to_the_same_checkpoint(logged, form):
    ref = form.format(run=logged["run_id"], model_uri=logged["model_uri"])
    m = refs.resolve(ref, logged["uri"])
    try:
        same_checkpoint(m.path, logged["ckpt"])
        assert m.train_run_id == logged["run_id"] and m.temp
    finally:
        refs.cleanup([m])
    assert not Path(m.path).exists()


def test_a_local_folder_and_s3_holding_the_model_resolve_to_the_same_checkpoint(
    logged, tmp_path, monkeypatch
):
    from tests.unit.test_tracking_refs import local_s3

    m = refs.resolve(logged["model_uri"], logged["uri"])
    try:  # the MLflow model as downloaded: MLmodel + artifacts/checkpoint
        shutil.copytree(Path(m.path).parent.parent, tmp_path / "s3" / "bucket" / "model")
    finally:
        refs.cleanup([m])
    local_s3(monkeypatch, tmp_path / "s3")
    for ref in (str(tmp_path / "s3" / "bucket" / "model"), "s3://bucket/model"):
        m = refs.resolve(ref)
        try:
            same_checkpoint(m.path, logged["ckpt"])
        finally:
            refs.cleanup([m])


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        ("runs:/{run}/nothing-here", "model runs:/{run}/nothing-here: not found in MLflow"),
        ("runs:/not-a-run", "model runs:/not-a-run: expected runs:/RUN_ID or runs:/RUN_ID/PATH"),
        ("models:/m-" + "0" * 32, "model models:/m-" + "0" * 32 + ": not found in MLflow"),
    ],
)
def test_uris_naming_nothing_are_one_error(logged, ref, message):
    ref, message = (x.format(run=logged["run_id"]) for x in (ref, message))
    with pytest.raises(CheckpointError) as e:
        refs.resolve(ref, logged["uri"])
    assert str(e.value).startswith(message)


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
