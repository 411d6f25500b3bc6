"""Training throughput on two Ray nodes against one, in one run, through the real path
(``ray job submit`` -> Ray Data from S3 -> Ray Train DDP over the nodes' network -> MLflow).

The nodes are network namespaces on this machine (``cluster/netns_cluster.py``, root only):
they share its cores, so the ratio here shows what the network, the gather of the global batch
and the second node's overhead cost; on separate machines each node brings its own cores.

    sudo PYTHONPATH=.:cluster .venv/bin/python benchmarks/multinode.py [--train N] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from netns_cluster import DASHBOARD_PORT, HEAD_IP, NetnsCluster, why_not_here

ROOT = Path(__file__).resolve().parent.parent
RATE = re.compile(r"epoch 1/1: loss .*?, (\d+) examples/s per worker")


def train(c: NetnsCluster, data: str, workers: int, overrides: list[str]) -> float:
    """One epoch of the demo config on ``workers`` workers (one per node): examples/s in all."""
    env = {k: v for k, v in c.env().items() if k.startswith(("AWS_", "MLFLOW_"))}
    cmd = ["ray", "job", "submit", "--address", f"http://{HEAD_IP}:{DASHBOARD_PORT}",
           "--working-dir", str(ROOT), "--runtime-env-json", json.dumps({"env_vars": env}),
           "--", "python", "jobs/train.py", "--config", "demo",
           "--data", data, "--workers", str(workers), "--cpus-per-worker", "2",
           "scaling.placement_strategy=SPREAD", "optim.epochs=1",
           f"tracking.storage_path=s3://shan/bench-runs-{workers}", *overrides]  # fmt: skip
    r = c.run_in_head(*cmd, timeout=1800)
    found = RATE.findall(r.stdout + r.stderr)
    if r.returncode or not found:
        tail = (r.stdout + r.stderr)[-3000:]
        raise SystemExit(f"training on {workers} worker(s) failed:\n{tail}")
    return float(found[-1]) * workers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", type=int, default=1200, help="train images (5 captions each)")
    p.add_argument("overrides", nargs="*", help="config overrides for both runs")
    args = p.parse_args()
    reason = why_not_here()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    state = Path(tempfile.mkdtemp(prefix="shan-bench-mn-"))
    c = NetnsCluster(state)
    try:
        c.make_head()
        c.start_services()
        c.start_head()
        for node in ("w1", "w2"):
            r = c.start_node(node, cpus=3)
            if r.returncode:
                raise SystemExit(f"node {node} did not start: {(r.stdout + r.stderr)[-2000:]}")
        data = "s3://shan/bench-data"
        r = c.run_in_head(sys.executable, "jobs/prepare_data.py", "synthetic", "--out", data,
                          "--train", str(args.train), "--dev", "100", "--test", "10")  # fmt: skip
        if r.returncode:
            raise SystemExit(f"no data set: {(r.stdout + r.stderr)[-2000:]}")
        t0 = time.monotonic()
        one = train(c, data, 1, args.overrides)
        two = train(c, data, 2, args.overrides)
        print(f"demo config, {args.train * 5} captions, global batch as configured; "
              f"{time.monotonic() - t0:.0f} s in all")  # fmt: skip
        print(f"one node, 1 worker:   {one:.0f} examples/s")
        print(f"two nodes, 2 workers: {two:.0f} examples/s")
        print(f"ratio two/one: {two / one:.2f} (the nodes share this machine's cores)")
    finally:
        left = c.down()
        if left:
            print(f"left behind: {left}")
        shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    main()
