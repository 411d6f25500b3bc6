"""The multi-node scenario, run as a driver inside the head's network namespace (where S3,
MLflow and the Ray dashboard listen) by ``test_multinode.py``::

    ip netns exec HEAD python -m tests.integration.multinode_scenario STATE

It acts on the cluster of ``STATE/cluster.json`` (nodes start and die through ``ip netns``)
and writes what it saw to ``STATE/scenario.json``; the test asserts on that.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netns_cluster import DASHBOARD_PORT, HEAD_IP, NetnsCluster
from shan_stack import BUCKET, S3_KEY, S3_SECRET

from shan.train import faults
from tests.helpers import ROOT

TINY = "tests/configs/tiny.yaml"  # in the job's working directory

DATA = f"s3://{BUCKET}/multinode"
STORAGE = f"s3://{BUCKET}/multinode-runs"  # Ray Train's, shared by every node
# 2 of a node's 3 CPUs: one worker per node, and a CPU left there to Ray Data's read tasks
WORKERS = ("--workers", "2", "--cpus-per-worker", "2", "scaling.placement_strategy=SPREAD")
NODE_CPUS = 3
TRAIN_IMAGES = 60  # 300 captions: 9 steps of 32 an epoch


class Scenario:
    def __init__(self, state: Path) -> None:
        from ray.job_submission import JobSubmissionClient

        self.state = state
        self.cluster = NetnsCluster.load(state)
        self.jobs = JobSubmissionClient(f"http://{HEAD_IP}:{DASHBOARD_PORT}")
        self.seen: dict[str, Any] = {"events": []}
        self.t0 = time.monotonic()

    def note(self, what: str, **values: Any) -> None:
        self.seen["events"].append({"t": round(time.monotonic() - self.t0, 1), "what": what})
        self.seen.update(values)
        print(f"[{time.monotonic() - self.t0:6.1f} s] {what}", flush=True)

    def submit(self, *argv: str, env: dict[str, str] | None = None) -> str:
        env = {**{k: v for k, v in self.cluster.env().items()
                  if k.startswith(("AWS_", "MLFLOW_"))}, **(env or {})}  # fmt: skip
        return self.jobs.submit_job(
            entrypoint=" ".join(["python", *argv]),
            runtime_env={"working_dir": str(ROOT), "env_vars": env},
        )

    def logs(self, job: str) -> str:
        return self.jobs.get_job_logs(job)

    def wait_for(self, what: str, test: Callable[[], Any], job: str, timeout: float) -> Any:
        """Poll ``test`` until it gives something true; a RuntimeError with the job's log tail
        after ``timeout`` seconds or when the job ends first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = test()
            if got:
                return got
            if self.jobs.get_job_status(job).is_terminal():
                got = test()
                if got:
                    return got
                break
            time.sleep(0.5)
        raise RuntimeError(f"no {what} within {timeout:g} s:\n{self.logs(job)[-4000:]}")

    def wait_job(self, job: str, timeout: float) -> str:
        self.wait_for("end", lambda: self.jobs.get_job_status(job).is_terminal(), job, timeout)
        return str(self.jobs.get_job_status(job))

    def line(self, job: str, text: str) -> Callable[[], str | None]:
        def find() -> str | None:
            return next((ln for ln in self.logs(job).splitlines() if text in ln), None)

        return find


def train(s: Scenario) -> str:
    """Submitted before any worker node exists; the nodes come, one of them dies and another
    replaces it."""
    name = f"mn-{s.cluster.tag}"
    job = s.submit("jobs/train.py", "--config", TINY, "--data", DATA, "--name", name,
                   "--register", name, *WORKERS, "--wait-timeout", "300",
                   f"tracking.storage_path={STORAGE}",
                   env=faults.env(rows_log=str(s.state / "rows")))  # fmt: skip
    waiting = s.wait_for("wait line", s.line(job, "waiting for the cluster to offer"), job, 180)
    time.sleep(3)  # still waiting: nothing started on the head's nothing
    s.note("training waits", waiting=waiting, started_early="Ray Train:" in s.logs(job))
    for node in ("w1", "w2"):
        r = s.cluster.start_node(node, cpus=NODE_CPUS)
        if r.returncode:
            raise RuntimeError(f"node {node} did not start: {(r.stdout + r.stderr)[-2000:]}")
    s.note("worker nodes up")
    s.wait_for("offer", s.line(job, "the cluster offered"), job, 120)
    s.note("training starts")
    s.wait_for("ranks", s.line(job, "rank 1 of 2 on node"), job, 300)
    s.note("ranks up")
    s.wait_for("first steps", s.line(job, "epoch 1/2 step 5/"), job, 300)
    s.note("first steps")
    s.wait_for("first epoch", s.line(job, "epoch 1/2: loss"), job, 300)
    s.note("first epoch")
    # Ray Train knows the checkpoint of epoch 1 once the ranks went on past its report
    s.wait_for("epoch 2 under way", s.line(job, "epoch 2/2 step 5/"), job, 300)
    killed = s.cluster.kill_node("w2")
    t_kill = time.monotonic()
    s.note("w2 killed", killed_processes=killed)
    r = s.cluster.start_node("w3", cpus=NODE_CPUS)  # the autoscaler's replacement
    if r.returncode:
        raise RuntimeError(f"node w3 did not start: {(r.stdout + r.stderr)[-2000:]}")
    s.note("w3 up")
    s.wait_for("resume", s.line(job, "resumed from the checkpoint of epoch 1"), job, 300)
    s.note("resumed", kill_to_resume_s=round(time.monotonic() - t_kill, 1))
    s.seen["train_status"] = s.wait_job(job, 300)
    s.seen["train_log"] = s.logs(job)
    s.note("training ended")
    return name


def evaluate(s: Scenario, name: str) -> None:
    """Actors on both worker nodes (w1 and w3); the matrix of one node."""
    out = s.state / "eval"
    job = s.submit("jobs/evaluate.py", "--model", f"models:/{name}/1", "--data", DATA,
                   "--split", "test", "--out", str(out), "--actors", "2", "--cpus-per-actor",
                   "0.5", "--tile-images", "20", "--tile-captions", "100")  # fmt: skip
    s.seen["eval_status"] = s.wait_job(job, 300)
    s.seen["eval_log"] = s.logs(job)
    s.note("evaluation ended")
    one_node(s, name, out)


def one_node(s: Scenario, name: str, out: Path) -> None:
    """The same model's matrix scored in this process, against the cluster's."""
    import numpy as np
    import torch

    from shan.checkpoint import load_model
    from shan.data.reader import read_split
    from shan.metrics import SCORES
    from shan.scoring import score_matrix
    from shan.tracking.refs import cleanup, resolve

    local = resolve(f"models:/{name}/1")
    try:
        model = load_model(local.path).model
    finally:
        cleanup([local])
    data = read_split(DATA, "test")
    ref = score_matrix(model, data.features, data.num_regions, data.tokens, torch.device("cpu"))
    s.seen["max_diff"] = {
        k: float(np.abs(np.load(out / f"sims_{k}.npy") - ref[k]).max()) for k in SCORES
    }


def mlflow_view(s: Scenario, name: str) -> None:
    from mlflow.tracking import MlflowClient

    from shan.tracking.runs import RUN_TAG, quote

    c = MlflowClient()
    exp = c.get_experiment_by_name("shan-tests")
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = {quote(name)}")
    token = Path(str(s.cluster.token_path)).read_text().strip()
    shown = json.dumps([{"params": r.data.params, "tags": r.data.tags} for r in runs])
    s.seen["secrets_in_run"] = [x for x in (S3_KEY, S3_SECRET, token) if x in shown]
    s.seen["runs"] = [
        {
            "status": r.info.status,
            "resumed_at_epoch": [m.value for m in c.get_metric_history(r.info.run_id,
                                                                        "train/resumed_at_epoch")],
            "val_rsum_steps": [m.step for m in c.get_metric_history(r.info.run_id, "val/rsum")],
        }
        for r in runs
    ]  # fmt: skip


def intruder(s: Scenario) -> threading.Thread:
    """A node with another token tries to join, while the training runs: it must not."""
    wrong = s.state / "wrong_token"
    wrong.write_text("0" * 64)
    s.cluster.make_node("intruder")

    def attempt() -> None:
        r = s.cluster.start_node("intruder", cpus=1, token=wrong, timeout=120)
        s.seen["intruder"] = {"returncode": r.returncode, "output": (r.stdout + r.stderr)[-1500:],
                              "address": s.cluster.addresses["intruder"]}  # fmt: skip

    thread = threading.Thread(target=attempt)
    thread.start()
    return thread


def nodes(s: Scenario) -> None:
    import ray.util.state

    found = ray.util.state.list_nodes(address=f"http://{HEAD_IP}:{DASHBOARD_PORT}")
    s.seen["nodes"] = [[n.node_ip, n.state] for n in found]


def main(state: Path) -> None:
    from shan.data.synthetic import generate_synthetic

    s = Scenario(state)
    generate_synthetic(DATA, images={"train": TRAIN_IMAGES, "dev": 40, "test": 60}, regions=6,
                       feature_dim=16, concepts=30, rows_per_file=15, chunk_rows=15,
                       log=lambda line: None)  # fmt: skip
    s.note("data set in S3")
    try:
        attempt = intruder(s)
        name = train(s)
        mlflow_view(s, name)
        evaluate(s, name)
        attempt.join(timeout=120)
        nodes(s)
    finally:
        (state / "scenario.json").write_text(json.dumps(s.seen, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
