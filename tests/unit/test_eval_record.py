"""An evaluation's MLflow run (``shan.eval.record.log_evaluation``) against a fake client: its
name and tags (models, split, protocol, training run, registered version), parameters, metrics
under the split's prefix, the output files as artifacts (too large ones left out and named in a
tag), and its end: FINISHED, or FAILED with the error passed on. No MLflow server is needed."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest

import shan.eval.record as record
from shan.eval.job import EvalOptions, EvalResult
from shan.eval.record import log_evaluation
from shan.tracking.refs import ModelRef

URI = "http://mlflow.invalid:5000"
TRAIN_RUN = "0123456789abcdef0123456789abcdef"


@dataclass
class FakeRun:
    exp_id: str
    name: str
    tags: dict
    params: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)  # file name -> bytes, read when logged
    inputs: list = field(default_factory=list)
    status: str | None = None


class FakeClient:
    """The MlflowClient calls log_evaluation makes; ``fail_on`` names one to raise in."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.runs: dict[str, FakeRun] = {}
        self.fail_on = fail_on
        self.ids = (f"run{i}" for i in itertools.count())
        self.artifact_dirs: list[str] = []

    def _maybe_fail(self, what: str) -> None:
        if self.fail_on == what:
            raise RuntimeError(f"fake MLflow: {what} failed")

    def create_run(self, exp_id, run_name=None, tags=None):
        rid = next(self.ids)
        self.runs[rid] = FakeRun(exp_id, run_name, dict(tags or {}))
        return SimpleNamespace(info=SimpleNamespace(run_id=rid))

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        self._maybe_fail("log_batch")
        for p in params:
            assert p.key not in self.runs[run_id].params, f"param {p.key} logged twice"
            self.runs[run_id].params[p.key] = p.value

    def log_metric(self, run_id, key, value, timestamp=None, step=None):
        self._maybe_fail("log_metric")
        self.runs[run_id].metrics[key] = value

    def log_artifacts(self, run_id, local_dir, artifact_path=None):
        self.artifact_dirs.append(local_dir)
        self._maybe_fail("log_artifacts")
        for p in Path(local_dir).iterdir():
            self.runs[run_id].artifacts[p.name] = p.read_bytes()

    def set_tag(self, run_id, key, value):
        self.runs[run_id].tags[key] = value

    def get_run(self, run_id):  # only a training run is looked up: its experiment
        assert run_id == TRAIN_RUN, run_id
        return SimpleNamespace(info=SimpleNamespace(run_id=run_id, experiment_id="exp-1"))

    def log_inputs(self, run_id, datasets=None, models=None):
        self.runs[run_id].inputs = list(datasets or [])

    def set_terminated(self, run_id, status=None, end_time=None):
        assert self.runs[run_id].status is None, "run terminated twice"
        self.runs[run_id].status = status


@pytest.fixture
def fake(monkeypatch):
    """The fake client, reached through the names record.py imports; which URI was checked."""
    c = FakeClient()
    seen: dict = {}
    monkeypatch.setattr(record, "tracking_uri", lambda: URI)
    monkeypatch.setattr(record, "check_reachable", lambda uri: seen.setdefault("reachable", uri))

    def client(uri):
        seen["client"] = uri
        return c

    monkeypatch.setattr(record, "client", client)

    def experiment_id(client, name):
        assert client is c
        seen["experiment"] = name
        return "exp-7"

    monkeypatch.setattr(record, "experiment_id", experiment_id)
    c.seen = seen
    return c


FILES = {
    "metrics.json": b'{"total": {"rsum": 312.5}}',
    "recall.md": b"| rsum |\n",
    "index.json": b"{}",
    "sims_total.npy": b"\x93NUMPY" + b"\0" * 4000,
}


def make_out(tmp_path: Path, files: dict[str, bytes] = FILES) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)
    return out


def make_result(models: list[ModelRef] | None = None, split: str = "test") -> EvalResult:
    models = models or [ModelRef("models:/shan@champion", "/tmp/ckpt")]
    metrics = {
        "total": {"rsum": 312.5, "i2t_r1": 40.0},
        "l2l": {"rsum": 250.0},
        "g2g": {"rsum": 200.25},
    }
    meta = {
        "model": [m.ref for m in models],
        "data": "s3://bkt/data",
        "split": split,
        "protocol": "plain",
        "images": 100,
        "captions": 500,
        "seconds": 1.5,
    }
    return EvalResult(metrics, "table", list(FILES), {**metrics, "meta": meta}, models)


def registered(ref="models:/shan-demo/3", version="3", run=TRAIN_RUN) -> ModelRef:
    return ModelRef(ref, "/tmp/ckpt", train_run_id=run, model_name="shan-demo", version=version)


def only_run(c: FakeClient) -> FakeRun:
    assert len(c.runs) == 1
    return next(iter(c.runs.values()))


def test_a_registered_model_is_tagged_and_every_result_logged(fake, tmp_path):
    out = make_out(tmp_path)
    opts = EvalOptions(split="test", protocol="plain", experiment="shan-eval-x")
    rid = log_evaluation(make_result([registered()]), str(out), opts)
    run = only_run(fake)
    assert rid == "run0" and fake.runs[rid] is run
    assert fake.seen == {"reachable": URI, "client": URI, "experiment": "shan-eval-x"}
    assert (run.exp_id, run.name, run.status) == ("exp-7", "eval-test-plain", "FINISHED")
    assert {k: v for k, v in run.tags.items() if k.startswith("shan.") and "note" not in k} == {
        "shan.model_ref": "models:/shan-demo/3",
        "shan.split": "test",
        "shan.protocol": "plain",
        "shan.train_run_id": TRAIN_RUN,
        "shan.model_name": "shan-demo",
        "shan.model_version": "3",
    }
    # meta without the model list, plus where the outputs are; values as strings
    assert run.params == {
        "data": "s3://bkt/data",
        "split": "test",
        "protocol": "plain",
        "images": "100",
        "captions": "500",
        "seconds": "1.5",
        "out": str(out),
    }
    assert run.metrics == {
        "test/rsum": 312.5,
        "test/i2t_r1": 40.0,
        "test/l2l/rsum": 250.0,
        "test/g2g/rsum": 200.25,
    }
    assert run.artifacts == FILES  # every file, byte for byte
    assert not any(Path(d).exists() for d in fake.artifact_dirs)  # the local copy is gone


def test_the_metric_prefix_and_run_name_follow_the_split_and_protocol(fake, tmp_path):
    out = make_out(tmp_path)
    opts = EvalOptions(split="dev", protocol="1k")
    log_evaluation(make_result(split="dev"), str(out), opts)
    run = only_run(fake)
    assert run.name == "eval-dev-1k" and fake.seen["experiment"] == "shan-eval"
    assert set(run.metrics) == {"dev/rsum", "dev/i2t_r1", "dev/l2l/rsum", "dev/g2g/rsum"}
    assert (run.tags["shan.split"], run.tags["shan.protocol"]) == ("dev", "1k")


def test_a_plain_checkpoint_has_no_training_or_registry_tags(fake, tmp_path):
    out = make_out(tmp_path)
    log_evaluation(make_result([ModelRef("/ckpts/epoch-3", "/ckpts/epoch-3")]), str(out),
                   EvalOptions())  # fmt: skip
    tags = only_run(fake).tags
    assert tags["shan.model_ref"] == "/ckpts/epoch-3"
    assert not {"shan.train_run_id", "shan.model_name", "shan.model_version"} & set(tags)


def test_an_ensemble_lists_every_model_and_tags_the_first_ones_origin(fake, tmp_path):
    out = make_out(tmp_path)
    models = [registered(), registered("runs:/" + "f" * 32 + "/checkpoint", None, "f" * 32)]
    models[1].model_name = None
    log_evaluation(make_result(models), str(out), EvalOptions(), extra_tags={"shan.why": "cron"})
    tags = only_run(fake).tags
    assert tags["shan.model_ref"] == "models:/shan-demo/3,runs:/" + "f" * 32 + "/checkpoint"
    assert tags["shan.train_run_id"] == TRAIN_RUN and tags["shan.model_version"] == "3"
    assert tags["shan.why"] == "cron"


def test_a_matrix_over_the_limit_stays_out_and_is_named_in_a_tag(fake, tmp_path):
    out = make_out(tmp_path)
    opts = EvalOptions(log_matrices_mb=2000 / 2**20)  # 2000 bytes: sims_total.npy is larger
    log_evaluation(make_result(), str(out), opts)
    run = only_run(fake)
    assert set(run.artifacts) == {"metrics.json", "recall.md", "index.json"}
    assert run.tags["shan.not_logged"] == f"sims_total.npy (too large; in {out})"
    assert run.status == "FINISHED"
    assert (out / "sims_total.npy").exists()  # the outputs themselves are untouched


def test_nothing_is_named_as_not_logged_when_everything_fits(fake, tmp_path):
    out = make_out(tmp_path)
    log_evaluation(make_result(), str(out), EvalOptions(log_matrices_mb=1.0))
    assert "shan.not_logged" not in only_run(fake).tags


@pytest.mark.parametrize("where", ["log_batch", "log_metric", "log_artifacts"])
def test_a_failure_while_logging_ends_the_run_failed_and_is_raised(fake, tmp_path, where):
    out = make_out(tmp_path)
    fake.fail_on = where
    with pytest.raises(RuntimeError, match=f"fake MLflow: {where} failed"):
        log_evaluation(make_result(), str(out), EvalOptions())
    assert only_run(fake).status == "FAILED"


def test_a_missing_output_file_fails_the_run_naming_the_file(fake, tmp_path):
    from shan.data.fs import StorageError

    out = make_out(tmp_path, {k: v for k, v in FILES.items() if k != "recall.md"})
    with pytest.raises(StorageError, match="recall.md"):
        log_evaluation(make_result(), str(out), EvalOptions())
    assert only_run(fake).status == "FAILED"


def test_an_unreachable_server_creates_no_run(fake, tmp_path, monkeypatch):
    from shan.errors import JobError

    def unreachable(uri):
        raise JobError(f"MLflow at {uri} is not reachable")

    monkeypatch.setattr(record, "check_reachable", unreachable)
    with pytest.raises(JobError, match="not reachable"):
        log_evaluation(make_result(), str(make_out(tmp_path)), EvalOptions())
    assert fake.runs == {}


def test_the_local_copy_is_removed_when_logging_the_artifacts_fails(fake, tmp_path):
    out = make_out(tmp_path)
    fake.fail_on = "log_artifacts"
    with pytest.raises(RuntimeError):
        log_evaluation(make_result(), str(out), EvalOptions())
    try:
        assert fake.artifact_dirs and not any(Path(d).exists() for d in fake.artifact_dirs)
    finally:
        import shutil

        for d in fake.artifact_dirs:
            shutil.rmtree(d, ignore_errors=True)


def test_the_run_links_the_model_and_its_training_run_and_names_its_source(fake, tmp_path):
    from shan.data.format import DatasetCard, SplitInfo

    out = make_out(tmp_path)
    result = make_result([registered()])
    result.card = DatasetCard("synthetic", 6, 16, splits={"test": SplitInfo(100, 500, ["a"])},
                              digest="ab" * 32)  # fmt: skip
    opts = EvalOptions(split="test")
    log_evaluation(result, str(out), opts, extra_tags={"mlflow.user": "someone-else"})
    run = only_run(fake)
    note = run.tags["mlflow.note.content"]
    assert "[shan-demo version 3](#/models/shan-demo/versions/3)" in note
    assert f"(#/experiments/exp-1/runs/{TRAIN_RUN})" in note and "table" in note
    assert run.tags["mlflow.project.entryPoint"] == "evaluate"
    assert run.tags["mlflow.source.type"] == "LOCAL"
    assert run.tags["mlflow.user"] == "someone-else"  # the caller's tag is kept
    [given] = run.inputs
    assert given.dataset.name == "synthetic" and given.dataset.digest == "ab" * 16
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "evaluation")]
    assert '"uri": "s3://bkt/data"' in given.dataset.source and given.dataset.source_type == "s3"
