"""Several Ray nodes for real (marker ``multinode``): a head and worker nodes, each in its own
network namespace with a private test address (``cluster/netns_cluster.py``), token
authentication on, S3 and MLflow in the head's namespace. One scenario, as a user's cluster
lives it (``multinode_scenario.py``, a driver in the head's namespace):

- an elastic training (``--workers 1-2``, checkpoints in S3) submitted to a head that offers
  no CPU or GPU waits for one worker's room and says so, and starts when two worker nodes join
  (scale from zero, as an autoscaler would do it): 2 ranks on 2 nodes, each caption of an
  epoch reaching exactly one of them;
- every process of one node is killed in epoch 2: the training goes on with one worker from
  the last checkpoint, no new node waited for; when a new node joins (as an autoscaler's
  would) the group grows back to two, and the run finishes: one MLflow run, FINISHED, whose
  ``train/workers`` goes 2 -> 1 -> 2; the timeline is printed (a fixed-size group resuming
  after a failure: test_train's continued run);
- the evaluation scores with actors on two nodes, and its matrix equals one node's;
- a node with a wrong token cannot join;
- teardown leaves no namespace, interface or process.

The scenario runs in the background from the session's first integration test on
(``conftest.py``, ``multinode_run.py``): most of its minutes are waits, and the suite goes on.

Skipped, with the reason in the test summary, where namespaces cannot be made.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from netns_cluster import namespaces_left, why_not_here

from tests.integration.multinode_scenario import EPOCHS, TRAIN_IMAGES

pytestmark = pytest.mark.multinode
NODE_LINE = re.compile(r"rank (\d) of 2 on node ([\d.]+)")  # a group of 2 workers


def rows_of(folder: Path, epoch: int, ranks: tuple[int, ...] = (0, 1)) -> dict[int, dict]:
    """The rows log of each of ``ranks`` for ``epoch``."""
    return {r: json.loads((folder / f"epoch{epoch}-rank{r}.json").read_text()) for r in ranks}


def changes(points: list[list]) -> list[int]:
    """The worker counts of ``train/workers`` points ``[time, step, workers]`` as they
    changed: [1, 1, 2, 2, 1, 2] -> [1, 2, 1, 2]."""
    counts = [int(p[2]) for p in points]
    return [n for i, n in enumerate(counts) if i == 0 or counts[i - 1] != n]


def check_rows(logs: dict[int, dict]) -> None:
    """Every train image (and so each of its 5 captions) reached exactly one rank of
    ``logs`` (rank -> its rows log)."""
    ids = [iid for log in logs.values() for iid, _ in log["rows"]]
    assert sorted(ids) == list(range(TRAIN_IMAGES)), "an image was read twice or not at all"
    assert sum(n for log in logs.values() for _, n in log["rows"]) == 5 * TRAIN_IMAGES
    assert all(log["rows"] for log in logs.values()), "a rank read nothing"


def test_two_nodes_elastic_lose_one_go_on_grow_back_evaluate(multinode, capsys):
    reason = why_not_here()  # here, not at import: collecting the tests makes no namespace
    if reason:
        pytest.skip(f"multi-node test: {reason}")
    assert multinode is not None, "the scenario was not started (conftest.py's fixture)"
    o = multinode.wait()  # started with the first integration test, beside the others
    seen, at, c, r = o.seen, o.addresses, o.cluster, o.result
    shown = "\n".join(seen.get("timeline_lines", []))
    with capsys.disabled():  # the timeline, in CI's output too
        print(f"\nmulti-node elastic training, seconds since it was submitted:\n{shown}")
    if o.error is not None:
        raise o.error
    assert r is not None and r.returncode == 0, r and r.stdout[-3000:] + r.stderr[-5000:]

    # scale from zero: it waited for one worker's room, and started when a node came
    assert "{CPU: 2} for 1 worker(s)" in seen["waiting"], seen["waiting"]
    assert "CPU 0/0" in seen["waiting"] and not seen["started_early"]
    assert seen["train_status"] == "SUCCEEDED", seen["train_log"][-4000:]

    # elastic: 2 workers (a group that started with 1, when a node came late, grew to 2),
    # 1 when w2 died in epoch 2 (no node waited for), 2 again when w3 joined
    assert changes(seen["workers"]) in ([2, 1, 2], [1, 2, 1, 2]), seen["workers"]
    assert seen["killed_in_epoch"] == 2 and seen["killed_processes"] > 0
    pairs = NODE_LINE.findall(seen["train_log"])  # each group of 2: its ranks on 2 nodes
    first, last = dict(pairs[:2]), dict(pairs[-2:])
    assert set(first) == set(last) == {"0", "1"}, pairs
    assert set(first.values()) == {at["w1"], at["w2"]}, pairs
    assert set(last.values()) == {at["w1"], at["w3"]}, pairs
    final = rows_of(o.state / "rows", EPOCHS)  # the last epoch: the regrown group's
    assert {log["node"] for log in final.values()} == {at["w1"], at["w3"]}
    check_rows(final)
    for epoch in range(1, EPOCHS + 1):  # an epoch that the group of 1 read alone: all of it
        if not (o.state / "rows" / f"epoch{epoch}-rank1.json").exists():
            check_rows(rows_of(o.state / "rows", epoch, ranks=(0,)))

    # one run, FINISHED, every epoch validated; resumed from epoch 1 after the death
    (run,) = seen["runs"]
    assert run["status"] == "FINISHED" and 1.0 in run["resumed_at_epoch"], run
    assert sorted(set(run["val_rsum_steps"])) == list(range(1, EPOCHS + 1)), run
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
    assert o.left == [] and namespaces_left(c.tag) == [] and c.processes_left() == []
