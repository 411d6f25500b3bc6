"""Train SHAN on Ray Train and log to MLflow.

    shan train                                  # the demo: generated data, local Ray
    shan train --config f30k --data s3://bucket/f30k model.glove_path=/data/glove.txt
    shan train --name my-run ...                # a stopped run of that name continues
    shan train --config f30k --print-config     # the resolved config, nothing started

Overrides are ``key=value`` with dotted keys (``optim.lr=1e-4``, ``scaling.num_workers=4``).
Every value is checked before anything starts; each bad one is an ``error:`` line (exit 2).
The config is the packaged one or the YAML file, then the overrides, then the flags (each sets
the key named in its help); the keys, their types, defaults and meanings are listed below.
A run name is letters, digits, '.', '_' and '-' (not starting with '.' or '-', no '..').
MLflow: ``MLFLOW_TRACKING_URI``, else ./mlflow.db (open it with the README's ``mlflow ui``);
credentials from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN.
Ray: ``RAY_ADDRESS`` (set for submitted jobs), else a local instance. On a cluster the workers
are asked for as given (--workers, --gpus-per-worker, --cpus-per-worker; default 1 worker of
1 CPU) and the job waits for the autoscaler (--wait-timeout); a local instance is sized from
the machine. ``--workers MIN-MAX`` makes the group elastic: it starts as soon as MIN workers
fit, goes on with the survivors after a node loss and grows towards MAX as nodes join; the
global batch (optim.batch_size) stays the same at any size.
"""

from __future__ import annotations

import argparse
import shutil

import yaml

from shan.config import Config, keys_help, load_config
from shan_cli.argtypes import positive, workers

FLAG_KEYS = (  # flags that set a config key (typed already: taken as they are)
    ("data", "data.path"),
    ("workers", "scaling.num_workers"),
    ("cpus_per_worker", "scaling.cpus_per_worker"),
    ("gpus_per_worker", "scaling.gpus_per_worker"),
    ("wait_timeout", "scaling.wait_timeout"),
    ("name", "tracking.run_name"),
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog=keys_help(max(100, shutil.get_terminal_size().columns - 2)),
        formatter_class=argparse.RawTextHelpFormatter,
        allow_abbrev=False,
    )
    p.add_argument(
        "--config", default="demo", help="a packaged config (demo, f30k, coco) or a YAML file"
    )
    p.add_argument(
        "--data", help="data set root, local or s3:// (data.path; default: the demo set)"
    )
    p.add_argument(
        "--name", help="run name; reuse it to continue a stopped run (tracking.run_name)"
    )
    p.add_argument("--register", metavar="NAME", help="register the best checkpoint as NAME")
    p.add_argument(
        "--workers",
        type=workers,
        metavar="N|MIN-MAX",
        help="training workers, or an elastic range such as 1-4 (scaling.num_workers)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=positive(float),
        help="GPUs per worker (scaling.gpus_per_worker; sets scaling.use_gpu)",
    )
    p.add_argument(
        "--cpus-per-worker", type=positive(float), help="CPUs per worker (scaling.cpus_per_worker)"
    )
    p.add_argument(
        "--wait-timeout",
        type=positive(float),
        metavar="SECONDS",
        help="on a cluster: how long to wait for the workers (scaling.wait_timeout)",
    )
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (YAML) and exit: nothing starts",
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML, the sections nested, in the dataclasses' order (a config
    file that ``--config`` takes back)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    values = {}  # flags are typed already: taken as they are (--name 2024 is the name "2024")
    for flag, key in FLAG_KEYS:
        if getattr(args, flag) is not None:
            values[key] = getattr(args, flag)
    if args.gpus_per_worker is not None:
        values["scaling.use_gpu"] = True
    cfg = load_config(args.config, list(args.overrides), values)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0

    from shan.tracking.runs import redact
    from shan.train.driver import run_training

    result = run_training(cfg, data=args.data, register=args.register)
    epoch = result.best_metrics["epoch"]
    print(f"\nDev recall of the best epoch ({epoch}){result.scope}, run {result.run_name}:")
    print(result.table)
    print(f"\nbest checkpoint: {result.best_checkpoint}")
    print(f"MLflow run {result.mlflow_run_id} at {redact(result.mlflow_uri)}")
    if result.mlflow_uri.startswith("sqlite:"):
        print(f"open the MLflow UI with: mlflow ui --backend-store-uri {result.mlflow_uri}")
    return 0
