"""Train SHAN on Ray Train and log to MLflow.

    shan train                                  # the demo: generated data, local Ray
    shan train --config f30k --data s3://bucket/f30k model.glove_path=/data/glove.txt
    shan train --name my-run ...                # a stopped run of that name continues

Overrides are ``key=value`` with dotted keys (``optim.lr=1e-4``, ``scaling.num_workers=4``).
Every value is checked before anything starts; each bad one is an ``error:`` line (exit 2).
A run name is letters, digits, '.', '_' and '-' (not starting with '.' or '-', no '..').
MLflow: ``MLFLOW_TRACKING_URI``, else ./mlflow.db (open it with the README's ``mlflow ui``);
credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN.
Ray: ``RAY_ADDRESS`` (set for submitted jobs), else a local instance. On a cluster the workers
are asked for as given (--workers, --gpus-per-worker, --cpus-per-worker; default 1 worker of
1 CPU) and the job waits for the autoscaler (--wait-timeout); a local instance is sized from
the machine.
"""

from __future__ import annotations

import argparse

from shan.config import load_config
from shan_cli.argtypes import at_least, positive


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--config", default="demo", help="a packaged config (demo, f30k, coco) or a YAML file"
    )
    p.add_argument("--data", help="data set root, local or s3:// (default: the demo set)")
    p.add_argument("--name", help="run name; reuse it to continue a stopped run")
    p.add_argument("--register", metavar="NAME", help="register the best checkpoint as NAME")
    p.add_argument("--workers", type=at_least(1), help="number of training workers")
    p.add_argument(
        "--gpus-per-worker", type=positive(float), help="GPUs per worker (implies GPU use)"
    )
    p.add_argument("--cpus-per-worker", type=positive(float), help="CPUs per worker")
    p.add_argument(
        "--wait-timeout",
        type=positive(float),
        metavar="SECONDS",
        help="on a cluster: how long to wait for the workers (default 1800)",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    values = {}  # flags are typed already: taken as they are (--name 2024 is the name "2024")
    for flag, key in (
        ("workers", "scaling.num_workers"),
        ("cpus_per_worker", "scaling.cpus_per_worker"),
        ("gpus_per_worker", "scaling.gpus_per_worker"),
        ("wait_timeout", "scaling.wait_timeout"),
        ("name", "tracking.run_name"),
    ):
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    if args.gpus_per_worker is not None:
        values["scaling.use_gpu"] = True
    cfg = load_config(args.config, list(args.overrides), values)

    from shan.tracking.runs import redact
    from shan.train.driver import run_training

    result = run_training(cfg, data=args.data, register=args.register)
    print(
        f"\nDev recall of the best epoch ({result.best_metrics['epoch']}), run {result.run_name}:"
    )
    print(result.table)
    print(f"\nbest checkpoint: {result.best_checkpoint}")
    print(f"MLflow run {result.mlflow_run_id} at {redact(result.mlflow_uri)}")
    if result.mlflow_uri.startswith("sqlite:"):
        print(f"open the MLflow UI with: mlflow ui --backend-store-uri {result.mlflow_uri}")
    return 0
