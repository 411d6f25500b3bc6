"""The multi-node scenario, run as a driver inside the head's network namespace (where S3,
MLflow and the Ray dashboard listen) by ``test_multinode.py``::

    ip netns exec HEAD python -m tests.integration.multinode_scenario STATE

It acts on the cluster of ``STATE/cluster.json`` (nodes start and die through ``ip netns``)
and writes what it saw to ``STATE/scenario.json``; the test asserts on that.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from netns_cluster import DASHBOARD_PORT, HEAD_IP, NetnsCluster
from shan_stack import BUCKET, S3_KEY, S3_SECRET

from shan.train import faults
from tests.helpers import ROOT

TINY = "tests/configs/tiny.yaml"  # in the job's working directory

DATA = f"s3://{BUCKET}/multinode"
STORAGE = f"s3://{BUCKET}/multinode-runs"  # Ray Train's, shared by every node
# 2 of a node's 3 CPUs: one worker per node, and a CPU left there to Ray Data's read tasks; an
# elastic group of 1 to 2 workers that checks for room to grow every 5 s; a point a step
# Right after a node dies, Ray still counts it (until its heartbeats are missed) and Ray Train's
# elastic policy asks for 2 workers again: that group start fails only after
# scaling.start_timeout (default 60 s, Ray's), then the group restarts with the 1 worker that fits
WORKERS = ("--workers", "1-2", "--cpus-per-worker", "2", "scaling.placement_strategy=SPREAD",
           "scaling.resize_interval=5", "scaling.start_timeout=30",
           "tracking.log_every=1")  # fmt: skip
EPOCHS = 6  # enough for the regrowth to come before the end
NODE_CPUS = 3
TRAIN_IMAGES = 60  # 300 captions: 9 steps of 32 an epoch
STEP_LINE = re.compile(r"epoch (\d+)/\d+ step (\d+)/")


class Scenario:
    def __init__(self, state: Path) -> None:
        from ray.job_submission import JobSubmissionClient

        self.state = state
        self.cluster = NetnsCluster.load(state)
        self.jobs = JobSubmissionClient(f"http://{HEAD_IP}:{DASHBOARD_PORT}")
        self.seen: dict[str, Any] = {"events": [], "timeline": {}}
        self.t0 = time.time()

    def note(self, what: str, **values: Any) -> None:
        self.seen["events"].append({"t": round(time.time() - self.t0, 1), "what": what})
        self.seen.update(values)
        print(f"[{time.time() - self.t0:6.1f} s] {what}", flush=True)

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

    def start_node(self, node: str) -> float:
        """Worker node ``node`` started; returns when it joined (time.time())."""
        r = self.cluster.start_node(node, cpus=NODE_CPUS)
        if r.returncode:
            raise RuntimeError(f"node {node} did not start: {(r.stdout + r.stderr)[-2000:]}")
        return time.time()

    def start_nodes(self, *names: str) -> dict[str, float]:
        """Worker nodes started together; when each joined: ``{"w1 joined": time.time()}``."""
        for node in names:  # one after the other: each takes the next address
            self.cluster.make_node(node)
        joined: dict[str, float] = {}
        with ThreadPoolExecutor(len(names)) as pool:
            for node, at in zip(names, pool.map(self.start_node, names), strict=True):
                joined[f"{node} joined"] = at
        return joined


class Workers:
    """The run's ``train/workers`` points, read from the MLflow server: ``(time.time(), step,
    workers, at_step)``, oldest first. A group logs one when it starts (``at_step`` False) and
    one with each step's ``train/loss`` (``at_step`` True)."""

    def __init__(self, name: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client, self.name, self.run_id = MlflowClient(), name, ""

    def points(self) -> list[tuple[float, int, int, bool]]:
        if not self.run_id:
            self.run_id = one_run_id(self.client, self.name) or ""
            if not self.run_id:
                return []
        history = self.client.get_metric_history
        steps = {(m.timestamp, m.step) for m in history(self.run_id, "train/loss")}
        got = history(self.run_id, "train/workers")
        return sorted((m.timestamp / 1000, m.step, int(m.value), (m.timestamp, m.step) in steps)
                      for m in got)  # fmt: skip

    def first_step(self) -> tuple[float, int, int, bool] | None:
        """The training's first step's point, or None."""
        return next((p for p in self.points() if p[3]), None)

    def first(
        self, workers: int, after: float, *, at_step: bool = True
    ) -> Callable[[], tuple[float, int, int, bool] | None]:
        """A test for :meth:`Scenario.wait_for`: the first point of ``workers`` logged after
        ``after`` (a step's; ``at_step`` False: a group's start)."""

        def find() -> tuple[float, int, int, bool] | None:
            wanted = (p for p in self.points() if p[2:] == (workers, at_step) and p[0] > after)
            return next(wanted, None)

        return find


def one_run_id(c: Any, name: str) -> str | None:
    from shan.tracking.runs import RUN_TAG, quote

    exp = c.get_experiment_by_name("shan-tests")
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = {quote(name)}")
    return runs[0].info.run_id if runs else None


def train(s: Scenario) -> str:
    """Elastic, 1 to 2 workers, submitted before any worker node exists: it starts when two
    nodes join together (with 2 workers, or with 1 and grows to 2 if one node came late), goes
    on with one worker when a node dies in epoch 2 (no replacement waited for), and grows back
    to two when another node joins."""
    name = f"mn-{s.cluster.tag}"
    t = s.seen["timeline"]
    t["start"] = time.time()
    job = s.submit("jobs/train.py", "--config", TINY, "--data", DATA, "--name", name,
                   "--register", name, *WORKERS, "--wait-timeout", "300",
                   f"optim.epochs={EPOCHS}", f"tracking.storage_path={STORAGE}",
                   env=faults.env(rows_log=str(s.state / "rows")))  # fmt: skip
    waiting = s.wait_for("wait line", s.line(job, "waiting for the cluster to offer"), job, 180)
    time.sleep(3)  # still waiting: nothing started on the head's nothing
    s.note("training waits", waiting=waiting, started_early="Ray Train:" in s.logs(job))
    workers = Workers(name)
    t.update(s.start_nodes("w1", "w2"))  # as an autoscaler adds them, at once
    s.note("w1 and w2 up")
    first = s.wait_for("first step", workers.first_step, job, 300)
    t[f"first step, {first[2]} worker(s)"] = first[0]
    s.note(f"first step, {first[2]} worker(s)")
    if first[2] != 2:  # one node came late: the group grows when it is there
        t["first step, 2 workers"] = s.wait_for("2 workers", workers.first(2, 0), job, 300)[0]
        s.note("first step with 2 workers")
    epoch = s.wait_for("epoch 2 with 2 workers", lambda: in_epoch_2(s, job, workers), job, 300)
    killed = s.cluster.kill_node("w2")
    t["w2 killed"] = time.time()
    s.note(f"w2 killed in epoch {epoch}", killed_processes=killed, killed_in_epoch=epoch)
    one = s.wait_for("1 worker again", workers.first(1, t["w2 killed"], at_step=False), job, 300)
    t["group of 1 worker restarted"] = one[0]
    one = s.wait_for("1 worker's step", workers.first(1, t["w2 killed"]), job, 300)
    t["first step, 1 worker after the death"] = one[0]
    s.note("first step with 1 worker after the death")
    t["w3 joined"] = s.start_node("w3")  # as an autoscaler's new node would
    s.note("w3 up")
    two = s.wait_for("regrowth", workers.first(2, t["w3 joined"]), job, 300)
    t["first step, 2 workers again"] = two[0]
    s.note("first step with 2 workers again")
    s.seen["train_status"] = s.wait_job(job, 600)
    t["end"] = time.time()
    s.seen["train_log"] = s.logs(job)
    s.seen["workers"] = workers.points()
    s.note("training ended")
    return name


def in_epoch_2(s: Scenario, job: str, workers: Workers) -> int | None:
    """The epoch (2 or later) whose 3rd step or later the group of 2 workers is at; None before."""
    points = workers.points()
    steps = STEP_LINE.findall(s.logs(job))
    if not points or points[-1][2] != 2 or not steps:
        return None
    epoch, step = map(int, steps[-1])
    return epoch if epoch >= 2 and step >= 3 else None


def timeline(seen: dict[str, Any]) -> list[str]:
    """The lines that show the run: seconds since the training was submitted, and from the
    node's death to the next step and to the regrowth."""
    t = seen["timeline"]
    lines = [f"{at - t['start']:7.1f} s  {what}" for what, at in
             sorted(t.items(), key=lambda kv: kv[1])]  # fmt: skip
    if "end" not in t:  # the scenario stopped before the end: what it saw up to there
        return lines
    death = t["w2 killed"]
    lines.append(
        f"from the node's death: {t['first step, 1 worker after the death'] - death:.1f} s to "
        f"the next step (1 worker), {t['first step, 2 workers again'] - death:.1f} s to the "
        f"regrowth (2 workers; the new node joined {t['w3 joined'] - death:.1f} s after the "
        f"death, the group grew {t['first step, 2 workers again'] - t['w3 joined']:.1f} s "
        "after it joined)"
    )
    return lines


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
        if "start" in s.seen["timeline"]:
            s.seen["timeline_lines"] = timeline(s.seen)
        (state / "scenario.json").write_text(json.dumps(s.seen, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
