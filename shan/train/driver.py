"""The training driver: data, MLflow run, Ray Train ``TorchTrainer``, and what is logged after.

``run_training`` is what ``jobs/train.py`` calls. It never parses the command line.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from shan.config import Config
from shan.data.format import load_card, load_vocab
from shan.errors import JobError
from shan.evaluation import unflat_metrics
from shan.metrics import format_table
from shan.train import scaling, tracking

ROOT = Path(__file__).resolve().parents[2]
DEMO_DATA = ROOT / "datasets" / "demo"


@dataclass
class TrainingResult:
    run_name: str
    mlflow_run_id: str
    mlflow_uri: str
    best_checkpoint: str
    best_metrics: dict[str, float]
    table: str


def ensure_demo_data(log=print) -> str:
    """The embedded default data set, generated on first use."""
    if not (DEMO_DATA / "dataset.json").is_file():
        from shan.data.synthetic import generate_synthetic

        log(f"generating the demo data set in {DEMO_DATA} (once)")
        generate_synthetic(str(DEMO_DATA), overwrite=True, log=log)
    return str(DEMO_DATA)


def new_run_name(cfg: Config) -> str:
    return f"shan-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def check_data(cfg: Config, root: str):
    """Card and vocabulary of ``root``, checked against the config."""
    card = load_card(root)
    for split in (cfg.data.train_split, cfg.data.val_split):
        if split not in card.splits:
            raise JobError(f"data set {root} has no {split!r} split (it has {list(card.splits)})")
    if card.feature_dim != cfg.model.feature_dim:
        raise JobError(
            f"data set {root} has {card.feature_dim}-d region features but model.feature_dim "
            f"is {cfg.model.feature_dim}: set model.feature_dim={card.feature_dim}"
        )
    return card, load_vocab(root, card)


def init_ray(log=print):
    """Connect to ``RAY_ADDRESS`` (a cluster, or a submitted job) or start a local instance
    that listens on 127.0.0.1 only."""
    if not os.environ.get("RAY_ADDRESS"):
        from shan.services import keep_ray_on_loopback

        keep_ray_on_loopback()
    import ray

    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        log(f"Ray: connecting to {address}" if address else "Ray: starting a local instance")
        # "local": always a new instance, never a stale cluster that `ray start` left recorded
        ray.init(address=address or "local", log_to_driver=True)
    return ray


def worker_error(e: Exception) -> str:
    """The most useful line of a Ray Train failure: the worker's own error when there is one."""
    text = str(e)
    for marker in ("JobError: ", "DataError: ", "ValueError: ", "RuntimeError: "):
        if marker in text:
            return text.rsplit(marker, 1)[1].strip().splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


def run_training(
    cfg: Config, data: str | None = None, register: str | None = None, log=print
) -> TrainingResult:
    """Train ``cfg`` on the data set at ``data`` (default: cfg.data.path, else the demo set)."""
    root = data or cfg.data.path or ensure_demo_data(log)
    cfg.data.path = root
    card, vocab = check_data(cfg, root)
    glove = None
    if cfg.model.glove_path:
        from shan.glove import load_glove

        glove = load_glove(cfg.model.glove_path, vocab, cfg.model.word_dim, seed=cfg.seed)
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    run_name = cfg.tracking.run_name or new_run_name(cfg)
    cfg.tracking.run_name = run_name
    run_id = tracking.start_run(
        uri,
        cfg.tracking.experiment,
        run_name,
        cfg.flat(),
        {"shan.data": root, "shan.config": cfg.name},
    )
    log(f"MLflow: run {run_id} ({run_name}) at {uri}")
    try:
        result = _fit(cfg, root, card, vocab, glove, uri, run_id, log)
        out = _log_outcome(cfg, uri, run_id, run_name, vocab, result, register, log)
    except BaseException as e:
        tracking.end_run(
            uri, run_id, "FAILED" if not isinstance(e, KeyboardInterrupt) else "KILLED"
        )
        if isinstance(e, JobError | KeyboardInterrupt):
            raise
        raise JobError(f"training failed: {worker_error(e)}") from e
    tracking.end_run(uri, run_id, "FINISHED")
    return out


def _fit(cfg, root, card, vocab, glove, uri, run_id, log):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train import ScalingConfig as RayScaling
    from ray.train.torch import TorchTrainer

    from shan.data.reader import open_split
    from shan.train.worker import train_loop_per_worker

    ray = init_ray(log)
    res = scaling.resolve(cfg.scaling, ray.cluster_resources())
    log(f"Ray Train: {res.describe()}")
    resources = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        resources["GPU"] = res.gpus_per_worker
    loop_cfg = {
        "config": cfg.to_dict(),
        "vocab": vocab.to_json(),
        "glove": None if glove is None else glove.tolist(),
        "mlflow_uri": uri,
        "mlflow_run_id": run_id,
        "data_root": root,
        "torch_threads": res.torch_threads,
        "train_captions": card.splits[cfg.data.train_split].captions,
    }
    storage = cfg.tracking.storage_path
    if storage and not storage.startswith("s3://"):
        storage = str(Path(storage).absolute())
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_cfg,
        scaling_config=RayScaling(
            num_workers=res.num_workers, use_gpu=res.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=cfg.tracking.run_name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.tracking.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.tracking.keep_checkpoints,
                checkpoint_score_attribute="val/rsum",
                checkpoint_score_order="max",
            ),
        ),
        datasets={"train": open_split(root, cfg.data.train_split).randomize_block_order()},
    )
    return trainer.fit()


def _best(result):
    pairs = [(c, m) for c, m in (result.best_checkpoints or []) if "val/rsum" in m]
    if not pairs:
        raise JobError("training ended without a checkpoint")
    return max(pairs, key=lambda cm: cm[1]["val/rsum"])


def _log_outcome(cfg, uri, run_id, run_name, vocab, result, register, log) -> TrainingResult:
    best_ckpt, best_metrics = _best(result)
    table = format_table(unflat_metrics(best_metrics))
    c = tracking.client(uri)
    with tempfile.TemporaryDirectory() as tmp:
        local = best_ckpt.to_directory(str(Path(tmp) / "checkpoint"))
        c.log_artifacts(run_id, local, artifact_path="checkpoint")
        for name in ("config.yaml", "vocab.json"):
            c.log_artifact(run_id, str(Path(local) / name))
        (Path(tmp) / "recall.md").write_text(
            f"# {run_name}: dev recall of the best epoch ({best_metrics['epoch']})\n\n{table}\n"
        )
        (Path(tmp) / "best_metrics.json").write_text(json.dumps(best_metrics, indent=2))
        c.log_artifact(run_id, str(Path(tmp) / "recall.md"))
        c.log_artifact(run_id, str(Path(tmp) / "best_metrics.json"))
        c.set_tag(run_id, "shan.best_epoch", str(best_metrics["epoch"]))
        c.log_metric(run_id, "best/val_rsum", best_metrics["val/rsum"])
        saved = _keep_local_copy(local, run_name)
    if register:
        version = register_checkpoint(c, run_id, register)
        log(f"registered {register} version {version}")
    return TrainingResult(run_name, run_id, uri, saved, best_metrics, table)


def _keep_local_copy(local: str, run_name: str) -> str:
    dest = Path.cwd() / "checkpoints" / run_name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(local, dest)
    return str(dest)


def register_checkpoint(c, run_id: str, name: str) -> str:
    """A model version of ``name`` whose source is the run's ``checkpoint/`` artifact."""
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name)
    except MlflowException:
        pass  # it exists
    source = f"{c.get_run(run_id).info.artifact_uri}/checkpoint"
    return c.create_model_version(name, source=source, run_id=run_id).version
