"""Sweep a training config with Ray Tune: one MLflow parent run, each trial a child run.

    shan sweep sweeps/lr-margin.yaml --config f30k --data s3://bucket/f30k
    shan sweep sweeps/paper-ablation.yaml --workers 2 optim.epochs=10
    shan sweep SWEEP.yaml --register shan-best   # the best trial's model, registered

SWEEP.yaml holds the search space over config keys (grid and random), ASHA's settings on
val/rsum and the table's layout (docs/sweeps.md). --config, --data, the flags and the
key=value overrides make the config every trial starts from, as for ``shan train``. Every
problem of the config and of the sweep file is an ``error:`` line (exit 2) before any trial
starts. At the end: the trials' table, the parent run's id and the best trial.
"""

from __future__ import annotations

import argparse

from shan.config import load_config
from shan_cli.argtypes import positive, workers
from shan_cli.train import FLAG_KEYS as TRAIN_FLAG_KEYS

# the training's flags that set a config key, less --wait-timeout (not a sweep's flag)
FLAG_KEYS = tuple(pair for pair in TRAIN_FLAG_KEYS if pair[0] != "wait_timeout")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    p.add_argument("sweep", metavar="SWEEP.yaml", help="the sweep file (docs/sweeps.md)")
    p.add_argument(
        "--config", default="demo", help="a packaged config (demo, f30k, coco) or a YAML file"
    )
    p.add_argument(
        "--data", help="data set root, local or s3:// (data.path; default: the demo set)"
    )
    p.add_argument("--name", help="the parent run's name (tracking.run_name); a new name")
    p.add_argument("--register", metavar="NAME", help="register the best trial's model as NAME")
    p.add_argument(
        "--workers",
        type=workers,
        help="training workers of each trial, N or MIN-MAX (elastic; scaling.num_workers)",
    )
    p.add_argument(
        "--gpus-per-worker",
        type=positive(float),
        help="GPUs per worker (scaling.gpus_per_worker; sets scaling.use_gpu)",
    )
    p.add_argument(
        "--cpus-per-worker", type=positive(float), help="CPUs per worker (scaling.cpus_per_worker)"
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    values = {
        key: getattr(args, flag) for flag, key in FLAG_KEYS if getattr(args, flag) is not None
    }
    if args.gpus_per_worker is not None:
        values["scaling.use_gpu"] = True
    cfg = load_config(args.config, list(args.overrides), values)

    from shan.sweep.spec import load_sweep

    sweep = load_sweep(args.sweep, cfg)

    from shan.sweep.job import run_sweep
    from shan.tracking.runs import redact

    result = run_sweep(cfg, sweep, data=args.data, register=args.register)
    print(f"\nSweep {result.run_name}: {len(result.trials)} trials, val/rsum of the best epoch:")
    print(result.table)
    best = result.best
    if best is not None:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in best.values.items())  # fmt: skip
        print(f"\nbest trial: {best.name} ({shown}): val/rsum {best.rsum:.1f}, run {best.run_id}")
    if result.registered:
        print(f"registered: {result.registered}")
    print(f"MLflow parent run {result.mlflow_run_id} at {redact(result.mlflow_uri)}")
    return 0
