"""Several Ray nodes for real (marker ``multinode``): a head and worker nodes, each in its own
network namespace with a private test address (``cluster/netns_cluster.py``), token
authentication on, S3 and MLflow in the head's namespace. One scenario, as a user's cluster
lives it (``multinode_scenario.py``, a driver in the head's namespace):

- a training submitted to a head that offers no CPU or GPU waits and says what for, and starts
  when worker nodes join (scale from zero, as an autoscaler would do it);
- its 2 ranks run on different nodes, and each caption of an epoch reaches exactly one of them;
- every process of one worker node is killed after the first checkpoint, and a new node takes
  its place (as an autoscaler's would): the training goes on from that checkpoint and
  finishes, one MLflow run;
- the evaluation scores with actors on two nodes, and its matrix equals one node's;
- a node with a wrong token cannot join;
- teardown leaves no namespace, interface or process.

Skipped, with the reason in the test summary, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest
from netns_cluster import NetnsCluster, namespaces_left, why_not_here

from tests.helpers import ROOT
from tests.integration.multinode_scenario import TRAIN_IMAGES

pytestmark = pytest.mark.multinode
NODE_LINE = re.compile(r"rank (\d) of 2 on node ([\d.]+)")


def rows_of(folder: Path, epoch: int) -> dict[int, dict]:
    """The rows log of each rank for ``epoch``."""
    return {r: json.loads((folder / f"epoch{epoch}-rank{r}.json").read_text()) for r in (0, 1)}


def check_rows(logs: dict[int, dict]) -> None:
    """Every train image (and so each of its 5 captions) reached exactly one rank."""
    ids = [iid for log in logs.values() for iid, _ in log["rows"]]
    assert sorted(ids) == list(range(TRAIN_IMAGES)), "an image was read twice or not at all"
    assert sum(n for log in logs.values() for _, n in log["rows"]) == 5 * TRAIN_IMAGES
    assert all(log["rows"] for log in logs.values()), "a rank read nothing"


def test_two_nodes_train_lose_one_resume_evaluate(tmp_path, capsys):
    reason = why_not_here()  # here, not at import: collecting the tests makes no namespace
    if reason:
        pytest.skip(f"multi-node test: {reason}")
    c = NetnsCluster(tmp_path)
    try:
        c.make_head()
        c.start_services()
        c.start_head()
        c.save()
        env = c.env({"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cluster'}"})
        r = c.run("head", sys.executable, "-m", "tests.integration.multinode_scenario",
                  str(tmp_path), env=env, timeout=840)  # fmt: skip
        seen = json.loads((tmp_path / "scenario.json").read_text())
    finally:
        left = c.down()
    at = NetnsCluster.load(tmp_path).addresses  # with the nodes the scenario made
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    workers = {at["w1"], at["w2"]}

    # scale from zero: it waited for exactly what it asked, and started when the nodes came
    assert "2 x {CPU: 2} for 2 worker(s)" in seen["waiting"]
    assert "CPU 0/0" in seen["waiting"] and not seen["started_early"]
    assert seen["train_status"] == "SUCCEEDED", seen["train_log"][-4000:]

    # the ranks on different nodes; every caption of an epoch reached exactly one rank
    first = dict(NODE_LINE.findall(seen["train_log"].split("the cluster offered")[1])[:2])
    assert set(first) == {"0", "1"} and set(first.values()) == workers, first
    rows = tmp_path / "rows"
    epoch1 = rows_of(rows, 1)
    assert {log["node"] for log in epoch1.values()} == workers
    check_rows(epoch1)
    epoch2 = rows_of(rows, 2)  # after the resume: the surviving node and the replacement
    assert {log["node"] for log in epoch2.values()} == {at["w1"], at["w3"]}
    check_rows(epoch2)

    # the lost node: resumed from the checkpoint of epoch 1, one run, FINISHED
    assert seen["killed_processes"] > 0
    (run,) = seen["runs"]
    assert run["status"] == "FINISHED" and run["resumed_at_epoch"] == [1.0]
    assert run["val_rsum_steps"] == [1, 2]
    assert seen["secrets_in_run"] == []  # neither the S3 keys nor the Ray token

    # the evaluation: actors on two nodes, the matrix of one node
    assert seen["eval_status"] == "SUCCEEDED", seen["eval_log"][-4000:]
    nodes = re.search(r"actors on nodes ([\d., ]+)", seen["eval_log"])
    assert nodes, seen["eval_log"][-3000:]
    assert set(nodes.group(1).strip().split(", ")) == {at["w1"], at["w3"]}
    assert max(seen["max_diff"].values()) < 1e-5, seen["max_diff"]

    # the wrong token: refused, never a node
    bad = seen["intruder"]
    assert bad["returncode"] != 0 and "InvalidAuthToken" in bad["output"], bad
    alive = {ip for ip, state in seen["nodes"] if state == "ALIVE"}
    assert bad["address"] not in alive and alive == {at[n] for n in ("head", "w1", "w3")}

    # teardown: no namespace, interface or process left
    assert left == [] and namespaces_left(c.tag) == [] and c.processes_left() == []
    with capsys.disabled():
        print(f"\nmulti-node: rank 0 on {first['0']}, rank 1 on {first['1']}; node killed -> "
              f"resumed epoch in {seen['kill_to_resume_s']} s; evaluation actors on "
              f"{nodes.group(1).strip()}; events: {seen['events']}")  # fmt: skip
