"""MLflow: where runs go, one run per training run (also across restarts), and logging."""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

from shan.errors import JobError

RUN_TAG = "shan.run_name"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else a SQLite store in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def check_reachable(uri: str, timeout: float = 10.0) -> None:
    """A tracking server must answer ``/health``; a clear JobError otherwise."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
            if r.status == 200:
                return
            raise JobError(f"MLflow tracking server {uri} answered /health with {r.status}")
    except OSError as e:
        raise JobError(f"MLflow tracking server {uri} is unreachable ({e})") from e


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(c, name: str) -> str:
    """The id of experiment ``name``, created when it does not exist yet."""
    exp = c.get_experiment_by_name(name)
    return exp.experiment_id if exp else c.create_experiment(name)


def start_run(uri: str, experiment: str, run_name: str, params: dict, tags: dict) -> str:
    """The MLflow run of Ray Train run ``run_name``: the existing one (continued) or a new one."""
    c = client(uri)
    exp_id = experiment_id(c, experiment)
    found = c.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'")
    if found:
        run_id = found[0].info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(exp_id, run_name=run_name, tags={RUN_TAG: run_name, **tags})
    log_params(c, run.info.run_id, params)
    return run.info.run_id


def log_params(c, run_id: str, params: dict) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def end_run(uri: str, run_id: str, status: str) -> None:
    client(uri).set_terminated(run_id, status=status)


class MetricLogger:
    """Batched metric logging to one run (used by rank 0 only)."""

    def __init__(self, uri: str, run_id: str):
        self.client, self.run_id = client(uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=items)
