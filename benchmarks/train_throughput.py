"""Training throughput with the demo config on this machine, through the real job path
(Ray Data -> Ray Train worker -> MLflow): examples/s per worker and the share of step time
spent waiting for data, measured over one epoch.

    python benchmarks/train_throughput.py [--epochs 1] [key=value ...]
"""

from __future__ import annotations

import argparse
import os
import tempfile

from shan.config import load_config
from shan.train.driver import run_training


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="shan-bench-train-")
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work}/mlflow.db")
    cfg = load_config("demo", [f"optim.epochs={args.epochs}", f"tracking.storage_path={work}",
                               "tracking.experiment=shan-bench", *args.overrides])  # fmt: skip
    result = run_training(cfg, log=lambda s: None)
    m = result.best_metrics
    print(
        f"demo config, {args.epochs} epoch(s): {m['train/epoch_examples_per_s']:.0f} training "
        f"examples/s per worker; {100 * m['train/data_wait']:.1f}% of step time waiting for "
        f"data; dev rsum {m['val/rsum']:.1f}"
    )


if __name__ == "__main__":
    main()
