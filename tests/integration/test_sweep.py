"""A sweep end to end: 4 trials of the tiny config on the session's Ray head, logged to its
MLflow server, one of them clearly worse (a learning rate of 1e-8: it does not learn) so that
ASHA stops it early."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from shan.sweep.job import BEST_TAG, PARENT_TAG, PLOT, STOPPED_TAG, SWEEP_TAG
from shan.tracking.runs import RUN_TAG, quote
from tests.helpers import ROOT, TINY

# the session's head (2 CPUs) runs one trial at a time (each needs a CPU for its reads besides
# its worker), in the grid's order: the bad rate comes last, when ASHA has recorded the others'
# rsum at epoch 1, and falls below the cutoff (the 75th percentile with factor 4)
SWEEP = """
name: tiny-lr
space:
  optim.lr: {grid: [3.0e-3, 4.0e-3, 5.0e-3, 1.0e-8]}
asha: {max_t: 2, grace_period: 1, reduction_factor: 4}
"""


def test_a_sweep_of_four_trials_with_asha(services, synthetic_small, tmp_path):
    from mlflow.tracking import MlflowClient

    (tmp_path / "sweep.yaml").write_text(SWEEP)
    r = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "sweep.py"), str(tmp_path / "sweep.yaml"),
         "--config", TINY, "--data", synthetic_small, "--workers", "1", "--cpus-per-worker",
         "0.25", f"tracking.storage_path={tmp_path / 'ray'}", "--register", "shan-tests-sweep"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=dict(os.environ),
    )  # fmt: skip
    out = r.stdout + r.stderr
    (tmp_path / "sweep.out").write_text(out)  # the whole console, kept with the test's files
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    # the job's own lines (Ray's actors' forwarded logs start with their "(name pid=...)")
    own = [ln for ln in out.splitlines() if not re.sub(r"\x1b\[[0-9;]*m", "", ln).startswith("(")]
    assert not [ln for ln in own if "Traceback" in ln or "Trial status" in ln], own
    parent_id = next(ln for ln in r.stdout.splitlines() if ln.startswith("MLflow parent run"))
    parent_id = parent_id.split()[3]
    c = MlflowClient()
    parent = c.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags[SWEEP_TAG] == "parent"
    assert parent.data.tags["mlflow.source.name"] == "jobs/sweep.py"
    assert parent.data.params["sweep.space.optim.lr"].startswith("grid [0.003")
    exp = parent.info.experiment_id
    children = c.search_runs([exp], filter_string=f"tags.`{PARENT_TAG}` = {quote(parent_id)}")
    assert len(children) == 4 and all(ch.info.status == "FINISHED" for ch in children)
    by_lr = {float(ch.data.params["optim.lr"]): ch for ch in children}
    bad = by_lr[1e-8]
    assert bad.data.tags.get(STOPPED_TAG) == "true"  # stopped by ASHA at its first rung
    assert len(c.get_metric_history(bad.info.run_id, "val/rsum")) == 1
    done = [ch for ch in children if STOPPED_TAG not in ch.data.tags]
    assert done and all(len(c.get_metric_history(ch.info.run_id, "val/rsum")) == 2 for ch in done)
    assert all(ch.outputs.model_outputs for ch in done)  # a finished trial logs its model
    for ch in children:  # each child a training run: params, curves, its name
        assert ch.data.params["model.d"] == "16"
        assert ch.data.tags[RUN_TAG].startswith(parent.data.tags[RUN_TAG] + "-t")
        assert ch.data.tags["mlflow.source.name"] == "jobs/sweep.py"
        assert c.get_metric_history(ch.info.run_id, "train/loss")
    # the table: best val/rsum first; the best child registered
    best = {ch.info.run_id: max(m.value for m in c.get_metric_history(ch.info.run_id, "val/rsum"))
            for ch in children}  # fmt: skip
    note = parent.data.tags["mlflow.note.content"]
    rows = [ln for ln in note.splitlines() if ln.startswith("| ") and "`" in ln.split("|")[-2]]
    ids = [ln.split("|")[-2].strip(" `") for ln in rows]
    assert sorted(ids) == sorted(best)
    assert [best[i] for i in ids] == sorted(best.values(), reverse=True)
    assert "stopped early (ASHA)" in note
    assert parent.data.tags[BEST_TAG] == ids[0]
    assert f"run {ids[0]}" in r.stdout and "best trial: t0" in r.stdout
    assert PLOT in {a.path for a in c.list_artifacts(parent_id)}
    versions = c.search_model_versions(f"name = {quote('shan-tests-sweep')}")
    assert versions and versions[0].run_id in {ch.info.run_id for ch in done}
