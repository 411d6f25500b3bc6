"""The multi-node scenario run in the background from the session's first integration test on
(``conftest.py``): its cluster lives in network namespaces of its own and most of its minutes
are waits (nodes joining, a dead node noticed, a group regrown), so the rest of the suite runs
meanwhile; ``test_multinode.py`` waits for it and asserts on what it saw."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns_cluster import NetnsCluster

from tests.helpers import ROOT

TIMEOUT = 840  # seconds the scenario may take, under a loaded machine too


@dataclass
class Outcome:
    """What the scenario left: its process, what it saw (``scenario.json``), the cluster's
    addresses, what teardown left, and the error that stopped it early (if any)."""

    state: Path
    cluster: NetnsCluster
    result: subprocess.CompletedProcess | None = None
    seen: dict[str, Any] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    left: list[str] = field(default_factory=list)
    error: BaseException | None = None


class MultinodeRun:
    """The scenario of ``multinode_scenario.py`` on a cluster in ``state``, in a thread."""

    def __init__(self, state: Path) -> None:
        self.outcome = Outcome(state, NetnsCluster(state))
        self.thread = threading.Thread(target=self._run, name="multinode", daemon=True)

    def start(self) -> MultinodeRun:
        self.thread.start()
        return self

    def wait(self) -> Outcome:
        self.thread.join(TIMEOUT + 120)
        return self.outcome

    def _run(self) -> None:
        o, c = self.outcome, self.outcome.cluster
        try:
            c.make_head()
            c.start_services()
            c.start_head()
            c.save()
            env = c.env({"PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'cluster'}"})
            o.result = c.run("head", sys.executable, "-m", "tests.integration.multinode_scenario",
                             str(o.state), env=env, timeout=TIMEOUT)  # fmt: skip
            o.seen = json.loads((o.state / "scenario.json").read_text())
        except BaseException as e:  # noqa: BLE001 (reported by the test)
            o.error = e
        finally:
            o.left = c.down()
            o.addresses = NetnsCluster.load(o.state).addresses  # with the nodes it made
