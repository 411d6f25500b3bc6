"""The training job end to end: a real Ray head (2 workers), a real MLflow server."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from shan_stack import free_port

from shan.tracking.runs import ERROR_TAG, ERROR_TYPE_TAG, RUN_TAG, quote
from shan.train import faults
from tests.cli import driver_lines, last_line
from tests.helpers import ROOT, TINY


def train(*args: str, env: dict | None = None, timeout: int = 420) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def run_tiny(
    name: str, data: str, storage, *extra: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    """The tiny config on ``data`` as run ``name``, Ray Train storage under ``storage``."""
    return train("--config", TINY, "--data", data, "--name", name,
                 f"tracking.storage_path={storage}", *extra, env=env)  # fmt: skip


def mlflow_runs(name: str):
    from mlflow.tracking import MlflowClient

    c = MlflowClient()
    exp = c.get_experiment_by_name("shan-tests")
    if exp is None:
        return c, []
    return c, c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_TAG}` = {quote(name)}")


def check(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def test_an_unnamed_run_then_continued_by_its_name(services, synthetic_small, tmp_path):
    """An unnamed run is a fresh, uniquely named run (``shan-<config>-<time>-<hex>``), never a
    continuation: an elastic group of 1 to 2 workers (``--workers 1-2``), one epoch, everything
    logged, the world size too. Given that name (``--name``) and more epochs, a second job
    continues it from its checkpoint with a fixed group of two, in the same MLflow run; a third
    of that name is refused while the second runs, and a fourth with another config after it.
    The second job's rank 1 is killed in epoch 2: Ray Train restarts the fixed-size group, which
    resumes from the checkpoint of epoch 1 again (a lost node's elastic group: test_multinode)."""
    r = train("--config", TINY, "--data", synthetic_small, f"tracking.storage_path={tmp_path}",
              "optim.epochs=1", "tracking.system_metrics_every=1", "--register",
              "shan-tests-unnamed", "--workers", "1-2", "scaling.resize_interval=5")  # fmt: skip
    check(r)
    text = r.stdout + r.stderr
    assert "Ray Train: 1 to 2 worker(s) (elastic)" in text
    groups = re.findall(r"workers: (\d) \(elastic 1-2\); batch 32 = (\d+(?: \+ \d+)*)", text)
    assert groups and all(split == {"1": "32", "2": "16 + 16"}[n] for n, split in groups), groups
    assert "Dev recall of the best epoch" in r.stdout and "| total |" in r.stdout
    out = (r.stdout + r.stderr).splitlines()
    said = [ln for ln in out if "epoch 1/1: loss" in ln]
    assert len(said) == 1, said  # each worker line reaches the driver once
    name = next(ln for ln in out if ln.startswith("Dev recall")).split("run ")[-1].rstrip(":")
    assert re.fullmatch(r"shan-tiny-\d{8}-\d{6}-[0-9a-f]{8}", name), name
    c, runs = mlflow_runs(name)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags[RUN_TAG] == name and run.info.status == "FINISHED"
    assert not c.get_metric_history(run.info.run_id, "train/resumed_at_epoch")
    assert run.data.params["model.d"] == "16" and run.data.params["optim.epochs"] == "1"
    loss_steps = {m.step for m in c.get_metric_history(run.info.run_id, "train/loss")}
    assert len(loss_steps) >= 2
    sizes = c.get_metric_history(run.info.run_id, "train/workers")
    assert loss_steps <= {m.step for m in sizes}  # the world size with each step's points
    assert {m.value for m in sizes} <= {1.0, 2.0} and sizes[-1].value == float(groups[-1][0])
    assert "val/g2g/i2t_r1" in run.data.metrics
    # the best checkpoint is the run's logged MLflow model, and the version registered from it
    (output,) = run.outputs.model_outputs
    model = c.get_logged_model(output.model_id)
    assert model.source_run_id == run.info.run_id and model.status == "READY"
    files = {a.path for a in c.list_logged_model_artifacts(output.model_id)}
    assert "MLmodel" in files, files
    versions = c.search_model_versions(f"run_id = {quote(run.info.run_id)}")
    assert [v.source for v in versions] == [f"models:/{output.model_id}"]
    assert versions[0].name == "shan-tests-unnamed"
    top = {a.path for a in c.list_artifacts(run.info.run_id)}
    assert {"recall.md", "config.yaml", "vocab.json"} <= top
    check_ui(c, run.info.run_id, synthetic_small, epoch=1)
    # continued by name, to epoch 2; while it runs, the same name is refused; rank 1 killed at
    # the 4th step of epoch 2 (18 steps an epoch), once
    kill = faults.env(kill_worker_at_step=21, kill_marker=str(tmp_path / "killed"))
    cont = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs" / "train.py"), "--config", TINY, "--data",
         synthetic_small, "--name", name, f"tracking.storage_path={tmp_path}", "optim.epochs=2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        env={**os.environ, **kill},
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and cont.poll() is None:
            if mlflow_runs(name)[1][0].info.status == "RUNNING":
                break
            time.sleep(0.5)
        busy = run_tiny(name, synthetic_small, tmp_path, "optim.epochs=2")
        out = cont.communicate(timeout=420)[0]
    finally:
        if cont.poll() is None:
            cont.kill()
    assert cont.returncode == 0, out[-3000:]
    assert busy.returncode == 2, busy.stderr[-3000:]
    last = last_line(busy.stderr)
    assert last.startswith(f"error: run '{name}' is running") and "--name" in last
    assert "Ray:" not in busy.stdout + busy.stderr  # refused before Ray started
    # resumed from epoch 1 when continued, and again by the group that replaced the killed one
    assert (tmp_path / "killed").exists() and out.count("[FailurePolicy] RETRY") == 1, out[-5000:]
    assert out.count("resumed from the checkpoint of epoch 1") == 2, out[-5000:]
    assert "workers: 2; batch 32 = 16 + 16" in out  # the fixed group of the tiny config
    assert "epoch 2/2: loss" in out and "epoch 1/2: loss" not in out
    c, runs = mlflow_runs(name)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    rid = runs[0].info.run_id
    resumed = c.get_metric_history(rid, "train/resumed_at_epoch")
    assert [m.value for m in resumed] == [1.0, 1.0]
    assert sorted(m.step for m in c.get_metric_history(rid, "val/rsum")) == [1, 2]
    # continuing the finished run with another config names what differs
    other = run_tiny(name, synthetic_small, tmp_path, "optim.lr=1e-3", "model.d_a=4")
    assert other.returncode == 2, other.stderr[-3000:]
    last = last_line(other.stderr)
    assert "started with another config" in last
    assert "optim.lr (0.002 there, 0.001 here)" in last and "model.d_a (8 there, 4 here)" in last
    assert mlflow_runs(name)[1][0].info.status == "FINISHED"
    check_ui(c, rid, synthetic_small, epoch=int(runs[0].data.tags["shan.best_epoch"]))


def check_ui(c, rid: str, data: str, epoch: int) -> None:
    """What the MLflow UI shows of a training run: its source, the data set as its input (once,
    also when continued), the best epoch's table as its description, the experiment's kind and
    the system metrics of the workers' node."""
    from shan.data.format import load_card
    from shan.runtime import on_cluster
    from shan.tracking.context import git_commit

    run = c.get_run(rid)
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "jobs/train.py"
    assert tags["mlflow.source.type"] == ("JOB" if on_cluster() else "LOCAL")
    assert tags["mlflow.project.entryPoint"] == "train" and tags["mlflow.user"]
    assert tags.get("mlflow.source.git.commit") == git_commit(str(ROOT))
    assert f"best epoch ({epoch})" in tags["mlflow.note.content"]
    assert "| total |" in tags["mlflow.note.content"]
    [given] = run.inputs.dataset_inputs
    assert given.dataset.name == load_card(data).name and data in given.dataset.source
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]
    exp = c.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert any(k.endswith("/cpu_utilization_percentage") for k in system), system


def test_job_submission_with_token_auth(services, synthetic_small, tmp_path):
    """``ray job submit --working-dir`` runs a job shim (it imports ``shan_cli`` from the
    uploaded folder) on the head with token authentication; a client without the token is
    refused. (A submitted training runs in test_cluster's end-to-end test.)"""
    ray_bin = str(Path(sys.executable).parent / "ray")
    r = subprocess.run(
        [ray_bin, "job", "submit", "--address", services.env["RAY_DASHBOARD_ADDRESS"],
         "--working-dir", str(ROOT), "--", "python", "jobs/prepare_data.py", "validate",
         synthetic_small],
        capture_output=True, text=True, timeout=300, env=os.environ.copy(),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "succeeded" in out.lower() and f"{synthetic_small}: valid" in out
    # without the token the head refuses the client
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    denied = subprocess.run(
        [ray_bin, "job", "list", "--address", services.env["RAY_DASHBOARD_ADDRESS"]],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert denied.returncode != 0


def failed_run(name: str, line: str, kind: str):
    """The one MLflow run of ``name``: FAILED with ``line`` and error type ``kind``, never
    resumed (no worker group restarted from a checkpoint)."""
    c, runs = mlflow_runs(name)
    assert len(runs) == 1, runs
    run = runs[0]
    assert run.info.status == "FAILED"
    assert run.data.tags[ERROR_TAG] == line and run.data.tags[ERROR_TYPE_TAG] == kind
    assert not c.get_metric_history(run.info.run_id, "train/resumed_at_epoch")
    return c, run


def test_non_finite_loss_fails_the_run_at_once(services, synthetic_small, tmp_path):
    """Rank 1's loss turns NaN early in epoch 2 (18 steps per epoch), after a checkpoint: the
    run ends FAILED with that line, and is not retried although tracking.max_failures is 2."""
    name = "tiny-nan"
    r = run_tiny(name, synthetic_small, tmp_path, env=faults.env(nan_at_step=22))
    line = "non-finite loss (nan) at epoch 2, step 22: lower optim.lr or check the data"
    assert r.returncode == 2, r.stderr[-3000:]
    assert last_line(r.stderr) == f"error: {line}"
    assert "Traceback" not in "\n".join(driver_lines(r.stderr))
    out = r.stdout + r.stderr
    assert "resumed from the checkpoint" not in out and "epoch 1/2: loss" in out
    assert "[FailurePolicy]" not in out  # Ray Train never saw a failure
    c, run = failed_run(name, line, "JobError")
    assert [m.step for m in c.get_metric_history(run.info.run_id, "val/rsum")] == [1]


def test_a_worker_user_error_crosses_as_its_type(services, synthetic_small, tmp_path):
    """A DataError of rank 1 in the steps reaches the driver as a DataError, the ranks stop
    together and nothing is retried."""
    name = "tiny-data-error"
    r = run_tiny(name, synthetic_small, tmp_path, "optim.epochs=1",
                 env=faults.env(fail_with="DataError", fail_at_step=5))  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    line = "debug: DataError on rank 1 at step 5"
    assert last_line(r.stderr) == f"error: {line}"
    assert "resumed from the checkpoint" not in r.stdout + r.stderr
    assert "[FailurePolicy]" not in r.stdout + r.stderr
    failed_run(name, line, "DataError")


def test_a_user_error_outside_the_steps_is_not_retried(services, synthetic_small, tmp_path):
    """Rank 1 raises when it starts, before the ranks can agree: its worker group fails, and
    the one that Ray Train starts again stops at once, finding the error left in the run."""
    name = "tiny-start-error"
    r = train("--config", TINY, "--data", synthetic_small, "--name", name,
              f"tracking.storage_path={tmp_path}",
              env={"RAY_DEDUP_LOGS": "0", **faults.env(fail_with="CheckpointError")})  # fmt: skip
    assert r.returncode == 2, r.stderr[-3000:]
    line = "debug: CheckpointError on rank 1 at start"
    assert last_line(r.stderr) == f"error: {line}"
    failed_run(name, line, "CheckpointError")
    out = r.stdout + r.stderr  # one restart (max_failures is 2), whose workers stop at once
    assert out.count("[FailurePolicy] RETRY") == 1, out[-5000:]
    assert "[FailurePolicy] RAISE" not in out


def test_on_a_cluster_gpus_are_asked_for_and_the_wait_ends_with_one_line(
    services, synthetic_small, tmp_path
):
    """The tests' head has 2 CPUs and no GPU. A training and an evaluation that ask for GPUs
    wait for them (they never fall back to the CPUs that are there), saying what they wait for,
    and --wait-timeout ends each wait with one line naming what they could not get."""
    from shan.data.format import load_vocab
    from tests.cli import run_job
    from tests.helpers import save_untrained

    r = run_tiny("tiny-wait", synthetic_small, tmp_path, "--workers", "1", "--gpus-per-worker",
                 "1", "--wait-timeout", "4")  # fmt: skip
    ask = "1 x {CPU: 0.5, GPU: 1} for 1 worker(s)"
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"waiting for the cluster to offer {ask} (CPU " in r.stdout, r.stdout[-3000:]
    last = last_line(r.stderr)
    assert last.startswith(f"error: the cluster did not offer {ask} within --wait-timeout 4 s"), (
        last
    )
    assert "GPU 0/0 free on 1 node(s)" in last and "Ray Train:" not in r.stdout
    ckpt = save_untrained(tmp_path / "ckpt", load_vocab(synthetic_small))
    r = run_job("evaluate", "--model", str(ckpt), "--data", synthetic_small, "--out",
                str(tmp_path / "out"), "--no-mlflow", "--actors", "2", "--gpus-per-actor", "1",
                "--wait-timeout", "3")  # fmt: skip
    ask = "2 x {CPU: 1, GPU: 1} for 2 actor(s)"
    assert r.returncode == 2, r.stderr[-3000:]
    assert last_line(r.stderr).startswith(f"error: the cluster did not offer {ask} within")
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_a_local_run_starts_its_own_instance_on_loopback(tmp_path):
    """`ray start` leaves /tmp/ray/ray_current_cluster behind; a job without RAY_ADDRESS must
    still start its own local instance instead of waiting for that cluster forever, and that
    instance listens on 127.0.0.1 only (no setting of the caller's needed for that)."""
    import tempfile

    record = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    saved = record.read_text() if record.exists() else None
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(f"127.0.0.1:{free_port()}")  # nobody listens there
    drop = ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    code = ("import psutil; from shan.runtime import init_ray; r = init_ray(lambda s: None); "
            "print('CPUS', r.cluster_resources()['CPU']); "
            "own = {p.pid for p in psutil.Process().children(recursive=True)}; "
            "print('LISTEN', sorted({c.laddr.ip for c in psutil.net_connections('inet') "
            "if c.status == 'LISTEN' and c.pid in own})); r.shutdown()")  # fmt: skip
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, cwd=ROOT, env=env)  # fmt: skip
    finally:
        if saved is None:
            record.unlink(missing_ok=True)
        else:
            record.write_text(saved)
    assert r.returncode == 0 and "CPUS" in r.stdout, r.stderr[-2000:]
    listen = eval(r.stdout.split("LISTEN", 1)[1].strip().splitlines()[0])
    assert listen and set(listen) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listen
