"""The training driver: data, MLflow run, Ray Train ``TorchTrainer``, and what is logged after.

``run_training`` is what ``jobs/train.py`` calls. It never parses the command line. Everything
that can be checked is checked before Ray starts or an MLflow run is touched: the config, the
data set, the tracking server, the local checkpoint folder, the run's name and state.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shan.checkpoint import FILES as CHECKPOINT_FILES  # all a local checkpoint copy holds
from shan.config import Config, ConfigError, ScalingConfig
from shan.data import fs
from shan.data.format import DatasetCard, load_card, load_vocab
from shan.data.reader import check_split
from shan.data.synthetic import demo_data_root
from shan.errors import USER_ERRORS, JobError, from_record
from shan.metrics import format_table
from shan.runtime import (
    Resources,
    failure_line,
    init_ray,
    on_cluster,
    plan_group,
    training_request,
    wait_for_room,
    worker_errors,
)
from shan.tracking import context, datasets, notes, runs
from shan.tracking.names import unflat_metrics
from shan.vocab import Vocabulary

START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"  # scaling.start_timeout


@dataclass
class TrainingResult:
    run_name: str
    mlflow_run_id: str
    mlflow_uri: str
    best_checkpoint: str
    best_metrics: dict[str, float]
    table: str
    scope: str = ""  # what the dev recall covers when not the whole split (dev_scope)


@dataclass(kw_only=True)
class Fit:
    """What one ``TorchTrainer.fit`` needs besides the config."""

    root: str  # the data set
    storage: str  # Ray Train's storage
    card: DatasetCard
    vocab: Vocabulary
    glove: np.ndarray | None  # (V, word_dim) float32
    uri: str  # MLflow
    run_id: str
    token: str  # the FatalBox token of this training
    callbacks: tuple[Any, ...] = ()  # Ray Train UserCallbacks (a sweep's trial: Tune's report)


def ensure_demo_data(log: Callable[[str], None] = print) -> str:
    """The embedded default data set (:func:`~shan.data.synthetic.demo_data_root`), generated
    on first use; its location is printed."""
    root = demo_data_root()
    if not (root / "dataset.json").is_file():
        from shan.data.synthetic import generate_synthetic

        log(f"generating the demo data set in {root} (once; SHAN_DEMO_DATA moves it)")
        generate_synthetic(str(root), overwrite=True, log=log)
    else:
        log(f"demo data set: {root}")
    return str(root)


def dev_scope(cfg: Config) -> str:
    """`` on the first N dev images (data.val_max_images)`` when validation scores only the
    first ``data.val_max_images`` images of the split, else ``""``: said wherever the dev recall
    is shown."""
    n = cfg.data.val_max_images
    return f" on the first {n} {cfg.data.val_split} images (data.val_max_images)" if n else ""


def new_run_name(
    cfg: Config,
    taken: Callable[[str], bool] = lambda name: False,
    *,
    prefix: str = "shan",
    label: str | None = None,
) -> str:
    """``<prefix>-<label>-<time>-<8 hex digits>`` (label: the config's name, 50 characters at
    most), one that ``taken`` does not know."""
    label = cfg.name[:50] if label is None else label
    for _ in range(20):
        stamp = time.strftime("%Y%m%d-%H%M%S")
        name = f"{prefix}-{label}-{stamp}-{secrets.token_hex(4)}"
        if not taken(name):
            return name
    raise JobError("found no unused run name in 20 tries")


def storage_root(cfg: Config) -> str:
    """Ray Train's storage: ``tracking.storage_path`` (absolute), else Ray's default."""
    storage = cfg.tracking.storage_path
    if storage is None:
        return os.path.expanduser("~/ray_results")  # ray.train.constants.DEFAULT_STORAGE_PATH
    return storage if fs.is_remote(storage) else str(Path(storage).absolute())


def checkpoint_dir(run_name: str) -> Path:
    """Where the best checkpoint of run ``run_name`` is copied: ``./checkpoints/<run>``."""
    return Path.cwd() / "checkpoints" / run_name


def check_checkpoint_dir(dest: Path) -> None:
    """``dest`` may be replaced only when it is absent or a checkpoint copy this project wrote
    (a real folder holding only model.pt, config.yaml and vocab.json)."""
    if not dest.exists() and not dest.is_symlink():
        return
    extra = None
    if dest.is_symlink() or not dest.is_dir():
        extra = "it is not a folder"
    else:
        for entry in sorted(dest.iterdir()):
            if entry.name not in CHECKPOINT_FILES or entry.is_symlink() or not entry.is_file():
                extra = f"it holds {entry.name}"
                break
    if extra:
        raise JobError(
            f"{dest} exists and is not a checkpoint folder of this project ({extra}), so the "
            "run's checkpoint would replace it: move it away or choose another --name"
        )


def check_local_gpus(sc: ScalingConfig) -> None:
    """A local run (no cluster) that asks for GPUs this machine does not have is refused
    before anything starts (the ``f30k`` and ``coco`` configs ask for one)."""
    if on_cluster() or not sc.use_gpu:
        return
    import torch

    fewest = (sc.worker_range() or (1, 1))[0]  # an elastic group starts with its min
    have, want = torch.cuda.device_count(), sc.gpus_per_worker * fewest
    if have < want:
        raise ConfigError(
            f"scaling.use_gpu is true ({want:g} GPU asked for) but this machine has {have} "
            "CUDA GPU(s): add scaling.use_gpu=false, or run against a cluster with RAY_ADDRESS"
        )


def check_data(cfg: Config, root: str) -> tuple[DatasetCard, Vocabulary]:
    """Card and vocabulary of ``root``, checked against the config."""
    card = load_card(root)
    for split in (cfg.data.train_split, cfg.data.val_split):
        if split not in card.splits:
            raise JobError(f"data set {root} has no {split!r} split (it has {list(card.splits)})")
        check_split(root, split, card)  # each row's num_regions, before MLflow or Ray
    if card.feature_dim != cfg.model.feature_dim:
        raise JobError(
            f"data set {root} has {card.feature_dim}-d region features but model.feature_dim "
            f"is {cfg.model.feature_dim}: set model.feature_dim={card.feature_dim}"
        )
    return card, load_vocab(root, card)


def run_training(
    cfg: Config,
    data: str | None = None,
    register: str | None = None,
    log: Callable[[str], None] = print,
    *,
    tags: dict[str, str] | None = None,
    callbacks: tuple[Any, ...] = (),
) -> TrainingResult:
    """Train ``cfg`` on the data set at ``data`` (default: cfg.data.path, else the demo set).

    A sweep's trial (shan.sweep) adds ``tags`` to the MLflow run (``mlflow.parentRunId``: a
    child run) and ``callbacks`` to Ray Train's (Tune's report of each epoch)."""
    cfg.validate()  # with scaling.num_workers set, the global batch's share too
    check_local_gpus(cfg.scaling)
    if cfg.tracking.run_name:  # a generated name is one whose folder does not exist
        check_checkpoint_dir(checkpoint_dir(cfg.tracking.run_name))
    given = data or cfg.data.path or ensure_demo_data(log)
    cfg.data.path = given  # as the user gave it: logged, and compared when a run continues
    # the workers run in other folders: they get the whole path
    root = given if fs.is_remote(given) else str(Path(given).absolute())
    card, vocab = check_data(cfg, root)
    glove = None
    if cfg.model.glove_path:
        from shan.glove import load_glove

        glove = load_glove(cfg.model.glove_path, vocab, cfg.model.word_dim)
    uri = runs.tracking_uri()
    runs.check_reachable(uri)
    storage = storage_root(cfg)
    run_name = cfg.tracking.run_name or new_run_name(cfg, lambda n: _taken(cfg, uri, storage, n))
    cfg.tracking.run_name = run_name
    run_id = runs.start_run(
        uri,
        cfg.tracking.experiment,
        run_name,
        cfg.flat(),
        {**context.source_tags("train", "jobs/train.py"), "shan.data": root,
         "shan.config": cfg.name, **(tags or {})},
    )  # fmt: skip
    log(f"MLflow: run {run_id} ({run_name}) at {runs.redact(uri)}")
    box = runs.FatalBox(uri, run_id, secrets.token_hex(8))
    with runs.Heartbeat(uri, run_id):
        try:
            datasets.log_dataset(runs.client(uri), run_id, card, given, "training")
            fit = Fit(
                root=root, storage=storage, card=card, vocab=vocab, glove=glove, uri=uri,
                run_id=run_id, token=box.token, callbacks=callbacks,
            )  # fmt: skip
            result = _fit(cfg, fit, log)
            out = _log_outcome(cfg, fit, result, register, log)
        except BaseException as e:
            error = _as_user_error(e, box)
            _end_failed(uri, run_id, error, log)
            if error is e:
                raise
            raise error from (None if isinstance(error, USER_ERRORS) else e)
    runs.end_run(uri, run_id, "FINISHED")
    return out


def _taken(cfg: Config, uri: str, storage: str, name: str) -> bool:
    """Whether a generated run name is in use: an MLflow run, Ray storage or a local copy."""
    c = runs.client(uri)
    exp = c.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None and runs.runs_named(c, exp.experiment_id, name):
        return True
    return fs.exists(fs.join(storage, name)) or checkpoint_dir(name).exists()


def _as_user_error(e: BaseException, box: runs.FatalBox) -> BaseException:
    """The error to raise for training failure ``e``: a user error a worker left in the box
    (as its own type), a user error as it is, else a JobError with the failure's line."""
    if isinstance(e, (KeyboardInterrupt, *USER_ERRORS)):
        return e
    try:
        record = box.read()
    except Exception:  # the tracking server is gone: the failure itself says more
        record = None
    if record is not None:
        return from_record(record)
    for _, error in worker_errors(e):
        if isinstance(error, USER_ERRORS):
            return error
    return JobError(f"training failed: {failure_line(e)}")


def _end_failed(uri: str, run_id: str, error: BaseException, log: Callable[[str], None]) -> None:
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    line = "; ".join(str(error).splitlines()) or type(error).__name__
    try:
        runs.end_run(uri, run_id, status, error=line, kind=type(error).__name__)
    except Exception as e:  # the training's own error matters more
        log(f"could not mark MLflow run {run_id} {status}: {type(e).__name__}")


def _fit(cfg: Config, fit: Fit, log: Callable[[str], None]) -> Any:
    """Ray Train's ``TorchTrainer`` over ``fit``: its ``Result``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from shan.data.reader import open_split
    from shan.train import faults
    from shan.train.worker import LoopSettings, train_loop_per_worker

    ray = init_ray(log)
    sc = cfg.scaling
    # read by Ray Train's controller, which the driver's environment reaches (Ray propagates it)
    os.environ[START_TIMEOUT_VAR] = f"{sc.start_timeout:g}"
    res = plan_group(training_request(sc), ray.cluster_resources())
    cfg.optim.batch_shares(res.count)  # a ConfigError before any wait or Ray Train
    if on_cluster():
        wait_for_room(res, sc.wait_timeout, strategy=sc.placement_strategy, log=log)
    log(f"Ray Train: {res.describe()}")
    settings = LoopSettings(
        config=cfg,
        vocab=fit.vocab,
        glove=fit.glove,
        mlflow_uri=fit.uri,
        mlflow_run_id=fit.run_id,
        fit_token=fit.token,
        data_root=fit.root,
        torch_threads=res.torch_threads,
        train_captions=fit.card.splits[cfg.data.train_split].captions,
        faults=faults.from_env(),  # the tests' only
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"settings": settings},
        scaling_config=ray_scaling(res, sc),
        run_config=RunConfig(
            name=cfg.tracking.run_name,
            storage_path=fit.storage,
            # a worker group that cannot start (its node died, no replacement came) is
            # retried by Ray Train's controller every scaling.start_timeout s: at most for
            # about --wait-timeout (Ray Train v2's FailureConfig, which ray.train gives at run
            # time; the type stubs resolve ray.train.FailureConfig to v1's, without the
            # argument). An elastic group that lost a worker (one of max_failures) does not
            # wait for a new node: until Ray marks the dead node gone it may try its old size
            # once more (start_timeout), then goes on from the last checkpoint with the
            # workers that fit, at least its min
            failure_config=FailureConfig(  # type: ignore[call-arg]
                max_failures=cfg.tracking.max_failures,
                controller_failure_limit=max(1, math.ceil(sc.wait_timeout / sc.start_timeout)),
            ),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.tracking.keep_checkpoints,
                checkpoint_score_attribute="val/rsum",
                checkpoint_score_order="max",
            ),
            callbacks=list(fit.callbacks) or None,
        ),
        datasets={"train": open_split(fit.root, cfg.data.train_split).randomize_block_order()},
    )
    result = trainer.fit()
    record = runs.FatalBox(fit.uri, fit.run_id, fit.token).read()
    if record is not None:  # the workers stopped together on a user error
        raise from_record(record)
    return result


def ray_scaling(res: Resources, sc: ScalingConfig) -> Any:
    """Ray Train's ``ScalingConfig`` of the sized group ``res``: an elastic group is
    ``num_workers=(min, max)``, checked for room to grow every ``scaling.resize_interval``
    seconds (Ray's ElasticScalingPolicy: it starts with as many workers as the cluster holds,
    at least min, restarts from the last checkpoint with the survivors after a loss, and
    restarts bigger when room appears)."""
    from ray.train.v2.api.config import ScalingConfig as RayScaling  # ray.train's, typed

    return RayScaling(
        num_workers=res.ray_workers(),
        use_gpu=res.use_gpu,
        resources_per_worker=res.ray_resources(),
        placement_strategy=sc.placement_strategy,
        elastic_resize_monitor_interval_s=sc.resize_interval,  # read by the elastic policy only
    )


def _best(result: Any) -> tuple[Any, dict[str, Any]]:
    pairs = [(c, m) for c, m in (result.best_checkpoints or []) if "val/rsum" in m]
    if not pairs:
        raise JobError("training ended without a checkpoint")
    return max(pairs, key=lambda cm: cm[1]["val/rsum"])


def _log_outcome(
    cfg: Config, fit: Fit, result: Any, register: str | None, log: Callable[[str], None]
) -> TrainingResult:
    """The best checkpoint logged to the run as its MLflow model (and registered from it), its
    recall table, and a local copy in ``./checkpoints/<run>``."""
    from shan.tracking import pyfunc

    uri, run_id, run_name = fit.uri, fit.run_id, str(cfg.tracking.run_name)
    best_ckpt, best_metrics = _best(result)
    table = format_table(unflat_metrics(best_metrics))
    scope = dev_scope(cfg)
    c = runs.client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = best_ckpt.to_directory(str(Path(tmp) / "checkpoint"))
        saved = _keep_local_copy(local, run_name, log)  # first: kept if MLflow then fails
        model_uri = pyfunc.log_model(uri, run_id, local, step=int(best_metrics["epoch"]))
        for name in ("config.yaml", "vocab.json"):
            c.log_artifact(run_id, str(Path(local) / name))
        (Path(tmp) / "recall.md").write_text(
            f"# {run_name}: dev recall of the best epoch ({best_metrics['epoch']}){scope}\n\n"
            f"{table}\n"
        )
        (Path(tmp) / "best_metrics.json").write_text(json.dumps(best_metrics, indent=2))
        c.log_artifact(run_id, str(Path(tmp) / "recall.md"))
        c.log_artifact(run_id, str(Path(tmp) / "best_metrics.json"))
        c.set_tag(run_id, "shan.best_epoch", str(best_metrics["epoch"]))
        notes.describe_training(c, run_id, run_name, best_metrics, table, scope=scope)
        c.log_metric(run_id, "best/val_rsum", best_metrics["val/rsum"])
    if register:
        version = pyfunc.register(uri, model_uri, register, run_id)
        log(f"registered {register} version {version} ({model_uri})")
    return TrainingResult(run_name, run_id, uri, saved, best_metrics, table, scope)


def _keep_local_copy(local: str, run_name: str, log: Callable[[str], None] = print) -> str:
    """Copy the checkpoint's files to ``./checkpoints/<run>``: written beside it first, then
    swapped in, replacing only a checkpoint folder of this project (checked again now)."""
    dest = checkpoint_dir(run_name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{run_name}.new-", dir=dest.parent))
    for name in CHECKPOINT_FILES:
        shutil.copy2(Path(local) / name, new / name)
    try:
        check_checkpoint_dir(dest)
    except JobError:
        log(f"{dest} changed during training: the checkpoint copy stays in {new}")
        return str(new)
    old = None
    if dest.exists():
        old = dest.parent / f".{run_name}.old-{secrets.token_hex(4)}"
        dest.rename(old)
    new.rename(dest)
    if old is not None:  # the previous copy: only our files go, anything that arrived stays
        for name in CHECKPOINT_FILES:
            (old / name).unlink(missing_ok=True)
        try:
            old.rmdir()
        except OSError:
            log(f"{old} holds files that are not a checkpoint's: left there")
    return str(dest)
