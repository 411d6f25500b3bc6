"""Model references: registered-model forms, MLflow's URI forms, S3 keys that would escape the
download folder, local folders, run ids, a tracking server that does not answer, and the
temporary folders' cleanup (no MLflow server, no S3: the downloads are replaced by local
stand-ins; tests/unit/test_tracking_pyfunc.py resolves every form against a real store)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from shan.errors import CheckpointError
from shan.tracking import refs
from shan.tracking.refs import RUN_ID, ModelRef, cleanup, parse_registered, resolve, safe_relative

RUN = "0123456789abcdef0123456789abcdef"


# -- registered models ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("models:/shan-demo@champion", ("shan-demo", "champion", None)),
        ("models:/shan-demo/3", ("shan-demo", None, "3")),
        ("models:/shan-demo/12", ("shan-demo", None, "12")),
        ("models:/team/shan/4", ("team/shan", None, "4")),  # the version is the last part
    ],
)
def test_parse_registered(ref, want):
    assert parse_registered(ref) == want


@pytest.mark.parametrize(
    "ref",
    [
        "models:/shan-demo",
        "models:/shan-demo/",
        "models:/shan-demo/latest",
        "models:/shan-demo/-1",
        "models:/shan-demo/1.5",
        "models:/3",
        "models://3",
        "models:/",
    ],
)
def test_bad_registered_forms(ref):
    with pytest.raises(
        CheckpointError, match=r"expected models:/NAME@ALIAS .* or models:/NAME/VERSION"
    ) as e:
        parse_registered(ref)
    assert ref in str(e.value)


@pytest.mark.parametrize("ref", ["models:/@champion", "models:/shan-demo@", "models:/m/\u0663"])
def test_empty_parts_and_foreign_digits_are_refused(ref):
    with pytest.raises(CheckpointError):
        parse_registered(ref)


# -- S3 keys --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "root", "want"),
    [
        ("bucket/run/model.pt", "bucket/run", "model.pt"),
        ("bucket/run/model.pt", "bucket/run/", "model.pt"),
        ("bucket/run/sub/vocab.json", "bucket/run", "sub/vocab.json"),
        ("bucket/run/..hidden", "bucket/run", "..hidden"),  # a name, not a parent
    ],
)
def test_safe_relative(key, root, want):
    assert safe_relative(key, root) == want


@pytest.mark.parametrize(
    "key",
    [
        "bucket/run/../other/model.pt",
        "bucket/run/a/../../x",
        "bucket/run/..",
        "bucket/run/./model.pt",
        "bucket/run//model.pt",
        "bucket/run/a/",
        "bucket/run/a\\..\\..\\x",
    ],
)
def test_keys_that_would_escape_are_refused(key):
    with pytest.raises(CheckpointError, match="would land outside the download") as e:
        safe_relative(key, "bucket/run", "s3://bucket/run")
    assert "s3://bucket/run" in str(e.value) and repr(key) in str(e.value)


@pytest.mark.parametrize("key", ["bucket/other/model.pt", "bucket/runner/model.pt", "bucket/run"])
def test_keys_outside_the_root_are_refused(key):
    with pytest.raises(CheckpointError, match="is not under it"):
        safe_relative(key, "bucket/run")


# -- resolve --------------------------------------------------------------------------------------
def checkpoint_folder(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("model.pt", "config.yaml", "vocab.json"):
        (folder / name).write_bytes(b"x")
    return folder


def test_a_local_folder_resolves_to_itself(tmp_path, monkeypatch):
    checkpoint_folder(tmp_path / "checkpoints" / "run-1")
    monkeypatch.chdir(tmp_path)
    m = resolve("checkpoints/run-1")
    assert m.path == str(tmp_path / "checkpoints" / "run-1")  # made absolute
    assert m.ref == "checkpoints/run-1" and m.temp is None and m.train_run_id is None
    cleanup([m])
    assert (tmp_path / "checkpoints" / "run-1" / "model.pt").is_file()  # never removed


def test_a_folder_without_model_pt(tmp_path):
    (tmp_path / "empty").mkdir()
    for ref in (str(tmp_path / "empty"), str(tmp_path / "nowhere")):
        with pytest.raises(CheckpointError, match=f"expected {ref}/model.pt"):
            resolve(ref)


def test_run_id_pattern():
    assert RUN_ID.match(RUN)
    for text in (RUN.upper(), RUN[:-1], RUN + "0", "g" * 32, f"./{RUN}"):
        assert not RUN_ID.match(text), text


def test_a_local_folder_named_like_a_run_id_is_a_folder(tmp_path, monkeypatch):
    checkpoint_folder(tmp_path / RUN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(refs, "_download_run", fail_if_called)
    m = resolve(RUN)
    assert m.path == str(tmp_path / RUN) and m.train_run_id is None and m.temp is None


def fail_if_called(*args, **kwargs):
    raise AssertionError("MLflow must not be asked")


def test_a_run_id_is_downloaded_into_a_temporary_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def download(run_id, uri, dest):
        seen.update(run_id=run_id, uri=uri, dest=dest)
        return str(checkpoint_folder(Path(dest) / "checkpoint"))

    monkeypatch.setattr(refs, "_download_run", download)
    m = resolve(RUN, "sqlite:///mlflow.db")
    assert seen["run_id"] == RUN and seen["uri"] == "sqlite:///mlflow.db"
    assert m.train_run_id == RUN and m.temp == seen["dest"]
    assert m.path == str(Path(seen["dest"]) / "checkpoint")
    assert Path(m.path, "model.pt").is_file()
    cleanup([m])
    assert not Path(seen["dest"]).exists() and m.temp is None
    cleanup([m])  # twice is harmless


def test_a_failed_run_download_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = {}

    def download(run_id, uri, dest):
        seen["dest"] = dest
        Path(dest, "partial").write_bytes(b"half")
        raise CheckpointError(f"model {run_id}: no checkpoint in that MLflow run")

    monkeypatch.setattr(refs, "_download_run", download)
    with pytest.raises(CheckpointError, match="no checkpoint in that MLflow run"):
        resolve(RUN)
    assert not Path(seen["dest"]).exists()


def local_s3(monkeypatch, root: Path) -> None:
    """``s3://bucket/...`` served from the local folder ``root``."""

    def filesystem(url):
        assert url.startswith("s3://")
        return pafs.LocalFileSystem(), str(root / url[len("s3://") :])

    monkeypatch.setattr(refs.fs, "filesystem", filesystem)


def test_an_s3_checkpoint_is_downloaded_and_cleaned_up(tmp_path, monkeypatch):
    checkpoint_folder(tmp_path / "s3" / "bucket" / "run")
    (tmp_path / "s3" / "bucket" / "run" / "extra").mkdir()
    (tmp_path / "s3" / "bucket" / "run" / "extra" / "notes.txt").write_text("hello")
    local_s3(monkeypatch, tmp_path / "s3")
    m = resolve("s3://bucket/run")
    assert m.temp == m.path and Path(m.path).parent == Path(tempfile.gettempdir())
    assert sorted(str(p.relative_to(m.path)) for p in Path(m.path).rglob("*") if p.is_file()) == [
        "config.yaml",
        "extra/notes.txt",
        "model.pt",
        "vocab.json",
    ]
    cleanup([m])
    assert not Path(m.path).exists()


def test_an_empty_s3_prefix(tmp_path, monkeypatch):
    (tmp_path / "s3" / "bucket" / "empty").mkdir(parents=True)
    local_s3(monkeypatch, tmp_path / "s3")
    with pytest.raises(CheckpointError, match="s3://bucket/empty: no checkpoint there"):
        resolve("s3://bucket/empty")


def test_cleanup_removes_only_temporary_folders(tmp_path):
    kept = checkpoint_folder(tmp_path / "kept")
    temps = [tempfile.mkdtemp(prefix="shan-model-test-") for _ in range(2)]
    models = [
        ModelRef("a", str(kept)),
        *(ModelRef(f"t{i}", t, temp=t) for i, t in enumerate(temps)),
    ]
    cleanup(models)
    assert kept.is_dir() and not any(Path(t).exists() for t in temps)
    assert [m.temp for m in models] == [None, None, None]


# -- MLflow's URI forms, the server asked first ---------------------------------------------------
@pytest.mark.parametrize(
    ("ref", "kind"),
    [
        (f"runs:/{RUN}", "run"),
        (f"runs:/{RUN}/", "run"),
        (f"runs:/{RUN}/model", "model"),
        (f"runs:/{RUN}/checkpoint", "model"),
        ("models:/m-" + "a" * 32, "model"),
    ],
)
def test_mlflow_forms_go_to_the_run_or_the_model_download(tmp_path, monkeypatch, ref, kind):
    seen = {}

    def run(run_id, uri, dest):
        seen.update(kind="run", what=run_id)
        return str(checkpoint_folder(Path(dest) / "checkpoint"))

    def model(source, uri, dest):
        seen.update(kind="model", what=source)
        return str(checkpoint_folder(Path(dest) / "checkpoint"))

    monkeypatch.setattr(refs, "_download_run", run)
    monkeypatch.setattr(refs, "_download_model", model)
    monkeypatch.setattr(refs, "_source_run", lambda c, ref: RUN)
    m = resolve(ref, f"sqlite:///{tmp_path}/mlflow.db")
    assert seen == {"kind": kind, "what": RUN if kind == "run" else ref}
    assert m.train_run_id == RUN and Path(m.path, "model.pt").is_file()
    cleanup([m])


@pytest.mark.parametrize(
    "ref", [RUN, f"runs:/{RUN}/model", "models:/m-" + "a" * 32, "models:/shan@champion"]
)
def test_a_tracking_server_that_does_not_answer_is_named_at_once(monkeypatch, ref):
    import socket
    import time

    from shan.errors import JobError

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("_download_run", "_download_model", "_registered"):
        monkeypatch.setattr(refs, name, fail_if_called)
    t0 = time.monotonic()
    with pytest.raises(JobError) as e:
        resolve(ref, f"http://bob:secret@127.0.0.1:{port}")
    assert str(e.value).startswith(f"MLflow tracking server http://bob:***@127.0.0.1:{port} is ")
    assert "secret" not in str(e.value) and time.monotonic() - t0 < 15


def test_lookups_run_with_mlflows_retries_bounded_unless_the_user_set_them(monkeypatch):
    import os

    from shan.tracking.runs import LOOKUP_HTTP, bounded_lookups

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "33")
    with bounded_lookups():
        from mlflow.environment_variables import (
            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES,
            MLFLOW_HTTP_REQUEST_TIMEOUT,
        )

        assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == int(
            LOOKUP_HTTP[MLFLOW_HTTP_REQUEST_MAX_RETRIES.name]
        )
        assert MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get() == 1
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 33  # the user's
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "33"


def test_an_mlmodel_nested_100000_deep_is_refused_without_recursion(tmp_path):
    (tmp_path / "MLmodel").write_text("flavors: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(CheckpointError, match="an MLflow model without a SHAN checkpoint"):
        refs.checkpoint_in(tmp_path, "s3://bucket/model")
