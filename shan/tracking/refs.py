"""Model references, resolved to a local checkpoint folder: a checkpoint folder (or a downloaded
MLflow model), an ``s3://`` URL, an MLflow run (its id, ``runs:/ID``, or ``runs:/ID/model``, the
run's model by name), a logged model as the MLflow UI shows it (``models:/m-...``), or a
registered model (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``).

The MLflow forms ask the tracking server: it must answer first (:func:`runs.check_reachable`,
one line naming it), and the lookups run under MLflow's own retry and timeout variables
(:func:`runs.bounded_lookups`), so a server gone in between fails in seconds.

A run or model version holds the checkpoint in one of two layouts: an MLflow model (``MLmodel``
and the checkpoint as its artifact ``artifacts/checkpoint``: :mod:`shan.tracking.pyfunc`, what
training logs) or, in runs and versions logged before, a plain checkpoint folder (the run's
``checkpoint/`` artifact). :func:`checkpoint_in` finds it in either.

A remote model is downloaded into a temporary folder of its own (:attr:`ModelRef.temp`), which
:func:`cleanup` removes; an S3 key that would land outside that folder (``..``) is refused."""

from __future__ import annotations

import posixpath
import re
import shutil
import tempfile
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs
import yaml

from shan.checkpoint import MODEL_FILE
from shan.config import bounded_yaml
from shan.data import fs
from shan.errors import CheckpointError, ConfigError
from shan.tracking import runs

if TYPE_CHECKING:
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.tracking import MlflowClient

RUN_ID = re.compile(r"^[0-9a-f]{32}$")
RUNS_URI = re.compile(r"^runs:/([0-9a-f]{32})(?:/(.*))?$")  # runs:/ID, runs:/ID/PATH
LOGGED_MODEL = re.compile(r"^m-[0-9a-f]{32}$")  # a logged model's id (models:/m-...)
ALIAS = re.compile(r"[A-Za-z0-9_-]+")  # MLflow's alias characters
VERSION = re.compile(r"[0-9]+")  # ASCII digits only (str.isdigit takes other scripts too)
ARTIFACT = "checkpoint"  # a run's checkpoint artifact; the MLflow model's artifact key


@dataclass
class ModelRef:
    """A model reference as given (``ref``) and the local checkpoint folder it resolved to."""

    ref: str
    path: str  # local checkpoint folder
    _: KW_ONLY
    train_run_id: str | None = None
    model_name: str | None = None
    version: str | None = None
    tags: dict = field(default_factory=dict)
    temp: str | None = None  # a download folder of ours, removed by cleanup()


def cleanup(models: list[ModelRef]) -> None:
    """Remove the temporary download folders of ``models``."""
    for m in models:
        if m.temp:
            shutil.rmtree(m.temp, ignore_errors=True)
            m.temp = None


def resolve(ref: str, uri: str | None = None) -> ModelRef:
    """Download what ``ref`` names (if remote) and return its local checkpoint folder."""
    if ref.startswith(("models:/", "runs:/")) or (RUN_ID.match(ref) and not Path(ref).exists()):
        runs.check_reachable(uri or runs.tracking_uri())
        with runs.bounded_lookups():
            return _tracked(ref, uri)
    if ref.startswith("s3://"):
        path = _download_s3(ref)
        try:
            found = checkpoint_in(path, ref)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise
        return ModelRef(ref, str(found), temp=path)
    if not Path(ref, MODEL_FILE).is_file() and not Path(ref, "MLmodel").is_file():
        raise CheckpointError(f"model {ref}: no checkpoint there (expected {ref}/{MODEL_FILE})")
    return ModelRef(ref, str(checkpoint_in(Path(ref).absolute(), ref)))  # or an MLflow model's


def safe_relative(key: str, root: str, name: str | None = None) -> str:
    """``key`` relative to ``root``, refused (CheckpointError) when it is absolute or has an
    empty, ``.`` or ``..`` part: it could land outside the download folder."""
    if not key.startswith(root.rstrip("/") + "/"):
        raise CheckpointError(f"model {name or root}: key {key!r} is not under it")
    rel = key[len(root.rstrip("/")) + 1 :]
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\\" in rel:
        raise CheckpointError(
            f"model {name or root}: refusing key {key!r} (it would land outside the download)"
        )
    return posixpath.join(*parts)


def _download_s3(url: str) -> str:
    filesystem, root = fs.filesystem(url)
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except (FileNotFoundError, OSError) as e:
        raise CheckpointError(f"model {url}: cannot list it ({e})") from e
    files = [i for i in infos if i.type == pafs.FileType.File]
    if not files:
        raise CheckpointError(f"model {url}: no checkpoint there")
    rels = [safe_relative(i.path, root, url) for i in files]  # every key checked before any write
    dest = Path(tempfile.mkdtemp(prefix="shan-model-"))
    try:
        for info, rel in zip(files, rels):
            target = dest.joinpath(*rel.split("/"))
            if not target.resolve().is_relative_to(dest.resolve()):
                raise CheckpointError(f"model {url}: refusing key {info.path!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with filesystem.open_input_stream(info.path) as src:
                target.write_bytes(src.read())
    except OSError as e:
        shutil.rmtree(dest, ignore_errors=True)
        raise CheckpointError(f"model {url}: cannot download it ({e})") from e
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return str(dest)


def _tracked(ref: str, uri: str | None) -> ModelRef:
    """A run (``ID``, ``runs:/ID``, ``runs:/ID/PATH``), a logged model (``models:/m-ID``) or a
    registered model, downloaded into a temporary folder."""
    body = ref.removeprefix("models:/")
    if ref.startswith("models:/") and not LOGGED_MODEL.match(body):
        return _registered(ref, uri)
    temp = tempfile.mkdtemp(prefix="shan-model-")
    try:
        run_id, path = _run_or_logged_model(ref, uri, temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ModelRef(ref, path, train_run_id=run_id, temp=temp)


def _run_or_logged_model(ref: str, uri: str | None, dest: str) -> tuple[str | None, str]:
    """(the run that made it, its local checkpoint folder) of a run or a logged model."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    m = RUNS_URI.match(ref)
    if m and not (m.group(2) or "").strip("/"):
        return m.group(1), _download_run(m.group(1), uri, dest)
    if RUN_ID.match(ref):
        return ref, _download_run(ref, uri, dest)
    if ref.startswith("runs:/") and not m:
        raise CheckpointError(f"model {ref}: expected runs:/RUN_ID or runs:/RUN_ID/PATH")
    try:  # runs:/ID/PATH (MLflow finds the run's model of that name) or models:/m-ID
        run_id = m.group(1) if m else _source_run(MlflowClient(tracking_uri=uri), ref)
        path = _download_model(ref, uri, dest)
    except (MlflowException, OSError) as e:
        raise CheckpointError(f"model {ref}: not found in MLflow ({e})") from e
    return run_id, str(checkpoint_in(path, ref))


def _source_run(c: MlflowClient, ref: str) -> str | None:
    """The run that logged the model ``models:/m-ID``."""
    return c.get_logged_model(ref.removeprefix("models:/")).source_run_id


def _download_run(run_id: str, uri: str | None, dest: str) -> str:
    """The checkpoint of run ``run_id``: its latest logged model, else (a run logged before
    the MLflow model) its ``checkpoint/`` artifact."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
        outputs = run.outputs.model_outputs if run.outputs else []
        if outputs:
            source = f"models:/{max(outputs, key=lambda o: o.step).model_id}"
            path = _download_model(source, uri, dest)
        else:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=ARTIFACT, tracking_uri=uri, dst_path=dest
            )
    except (MlflowException, OSError) as e:
        raise CheckpointError(f"model {run_id}: no checkpoint in that MLflow run ({e})") from e
    return str(checkpoint_in(path, run_id))


def _download_model(source: str, uri: str | None, dest: str) -> str:
    """Download a model version's source or a logged model (``models:/m-...``): MLflow 3.x
    looks ``models:/`` URIs up through the global tracking URI, so it is set for the call."""
    import mlflow

    if uri is None:
        return mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=dest)
    with runs.using_tracking_uri(uri):
        return mlflow.artifacts.download_artifacts(
            artifact_uri=source, tracking_uri=uri, dst_path=dest
        )


def parse_registered(ref: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, ALIAS, None); ``models:/NAME/3`` -> (NAME, None, "3")."""
    body = ref[len("models:/") :]
    if "@" in body:
        name, alias = body.split("@", 1)
        if name and ALIAS.fullmatch(alias):
            return name, alias, None
    else:
        name, _, version = body.rpartition("/")
        if name and VERSION.fullmatch(version):
            return name, None, version
    raise CheckpointError(
        f"model {ref}: expected models:/NAME@ALIAS (letters, digits, '_', '-') or "
        "models:/NAME/VERSION (digits)"
    )


def registered_version(c: MlflowClient, ref: str) -> ModelVersion:
    """The model version ``ref`` (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``) names;
    MlflowException when the registry has no such version."""
    name, alias, version = parse_registered(ref)
    if alias is not None:
        return c.get_model_version_by_alias(name, alias)
    assert version is not None  # parse_registered gives an alias or a version
    return c.get_model_version(name, version)


def _registered(ref: str, uri: str | None) -> ModelRef:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    c = MlflowClient(tracking_uri=uri)
    temp = tempfile.mkdtemp(prefix="shan-model-")
    try:
        mv = registered_version(c, ref)
        path = str(checkpoint_in(_download_model(str(mv.source), uri, temp), ref))
    except (MlflowException, OSError) as e:
        shutil.rmtree(temp, ignore_errors=True)
        raise CheckpointError(f"model {ref}: not found in the registry ({e})") from e
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return ModelRef(
        ref, path, train_run_id=mv.run_id, model_name=mv.name, version=str(mv.version),
        tags=dict(mv.tags or {}), temp=temp,
    )  # fmt: skip


def checkpoint_in(folder: str | Path, ref: str | None = None) -> Path:
    """The checkpoint folder inside a download: ``folder`` itself (a plain checkpoint, as runs
    and versions before the MLflow model logged it), or the ``checkpoint`` artifact of an MLflow
    model (``MLmodel`` + ``artifacts/checkpoint``); CheckpointError when it holds neither."""
    folder = Path(folder)
    if (folder / MODEL_FILE).is_file():
        return folder
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        rel = _artifact_path(mlmodel)
        if rel and (folder / rel / MODEL_FILE).is_file():
            return folder / rel
        raise CheckpointError(
            f"model {ref or folder}: an MLflow model without a SHAN checkpoint artifact"
        )
    raise CheckpointError(f"model {ref or folder}: no {MODEL_FILE} and no MLmodel there")


def _artifact_path(mlmodel: Path) -> str | None:
    """The relative folder of the ``checkpoint`` artifact that ``MLmodel`` names."""
    try:  # bounded: an MLmodel of a folder or s3:// prefix is anyone's file
        conf = bounded_yaml(mlmodel.read_text(), str(mlmodel))
        path = conf["flavors"]["python_function"]["artifacts"][ARTIFACT]["path"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError, KeyError, TypeError):
        return None
    parts = Path(str(path)).parts
    if Path(str(path)).is_absolute() or ".." in parts:
        return None
    return str(path)
