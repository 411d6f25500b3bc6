"""Screenshots of the MLflow UI over a finished demo run, with headless Chromium.

    python benchmarks/ui_screenshots.py                  # a short demo run, then the pictures
    python benchmarks/ui_screenshots.py --work DIR       # reuse DIR's store when it has runs

It trains the demo config (``--epochs``, default 2) registering ``shan-demo``, evaluates
version 1 on the demo test split, starts ``mlflow server`` on 127.0.0.1 over that store and
takes, with Debian's ``chromium`` (installed with apt-get when it is missing and we are root):

- ``mlflow_run_overview.png``: the training run's overview (source, data set, registered
  model, description, metrics, parameters and, at its foot, the logged model);
- ``mlflow_run_metrics.png``: its model metrics (``train/loss``, ``val/rsum``, ...);
- ``mlflow_run_system_metrics.png``: its system metrics;
- ``mlflow_eval_plots.png``: the evaluation run's recall-at-K plot in the artifact viewer;
- ``mlflow_sweep_runs.png``: a sweep (``shan sweep``, 3 learning rates with ASHA, run as
  ``ui-sweep``): its parent run with the trials' child runs nested under it in the runs list;
- ``mlflow_sweep_parent.png``: the parent run: its description (the trials' table) and params;
- ``mlflow_sweep_plot.png``: the parent's plot (``sweep.png``: val/rsum against the rate).

``--sweep-only`` takes the sweep's three alone, of a sweep named ``ui-sweep`` already in
``--work``'s store (e.g. ``shan sweep ... --name ui-sweep`` with ``MLFLOW_TRACKING_URI`` set to
it): the demo sweep takes the demo training's time three times over.

The pictures go to ``--out`` (default ``docs/images``); the README shows the overview. Every
process started here is stopped by its id.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "shan-demo"
SWEEP = "ui-sweep"  # the demo sweep's parent run
VIEW = "workflowType=machine_learning"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium() -> str:
    """The chromium binary, installed from Debian when it is missing and we may."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0:
        sys.exit("error: chromium is not installed (apt-get install chromium)")
    print("installing chromium (apt-get install -y chromium) ...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True)
    return shutil.which("chromium") or sys.exit("error: chromium did not install")


def job(work: Path, env: dict, *args: str) -> None:
    print("+ python", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], cwd=work, env=env, check=True)


def demo_runs(work: Path, env: dict, epochs: int) -> None:
    """A finished demo training registered as MODEL, and an evaluation of its version 1."""
    train = str(ROOT / "jobs" / "train.py")
    job(work, env, train, "--name", "ui-demo", "--register", MODEL, f"optim.epochs={epochs}")
    evaluate = str(ROOT / "jobs" / "evaluate.py")
    data = env["SHAN_DEMO_DATA"]
    job(work, env, evaluate, "--model", f"models:/{MODEL}/1", "--data", data, "--split", "test",
        "--out", str(work / "eval"))  # fmt: skip


def demo_sweep(work: Path, env: dict, epochs: int) -> None:
    """A finished sweep of the demo config, named SWEEP: 3 learning rates, ASHA from epoch 1
    (the rate of 1e-8 does not learn: it is stopped early)."""
    sweep = work / "ui-sweep.yaml"
    sweep.write_text(
        "space:\n  optim.lr: {grid: [2.0e-4, 1.0e-3, 1.0e-8]}\n"
        f"asha: {{max_t: {epochs}, grace_period: 1, reduction_factor: 2}}\n"
    )
    job(work, env, str(ROOT / "jobs" / "sweep.py"), str(sweep), "--name", SWEEP)


def find_sweep(uri: str) -> tuple[str, str]:
    """(experiment id, run id) of the sweep's parent run."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    found = [
        r
        for e in c.search_experiments()
        for r in c.search_runs([e.experiment_id], filter_string=f"tags.`shan.run_name` = '{SWEEP}'")
    ]
    if not found:
        sys.exit(f"error: no sweep run {SWEEP!r} in {uri}")
    return found[0].info.experiment_id, found[0].info.run_id


def find_runs(uri: str) -> tuple[str, str, str]:
    """(experiment id, training run id, evaluation run id) of the store's newest runs."""
    from mlflow.tracking import MlflowClient

    c = MlflowClient(uri)
    mv = c.get_model_version(MODEL, "1")
    train = c.get_run(mv.run_id)
    evals = c.search_runs(
        [train.info.experiment_id, *[e.experiment_id for e in c.search_experiments()]],
        filter_string="tags.`mlflow.runName` LIKE 'eval%'",
        order_by=["attributes.start_time DESC"],
    )
    if not evals:  # the evaluation's runs are named after the model; take any non-training run
        evals = [
            r
            for e in c.search_experiments()
            for r in c.search_runs([e.experiment_id], order_by=["attributes.start_time DESC"])
            if r.info.run_id != train.info.run_id
        ]
    return train.info.experiment_id, train.info.run_id, evals[0].info.run_id


def serve(work: Path, uri: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    mlflow = str(Path(sys.executable).parent / "mlflow")
    proc = subprocess.Popen(
        [mlflow, "server", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port",
         str(port), "--workers", "1"],
        cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2):
                return proc, base
        except OSError:
            time.sleep(0.5)
    stop(proc)
    sys.exit("error: the MLflow server did not answer in 60 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def shoot(browser: str, url: str, dest: Path, profile: Path, height: int = 1100) -> None:
    """One screenshot; headless Chromium sometimes never ends its virtual-time budget while
    the UI polls, so a try that takes over 60 s is killed (its whole group) and made again."""
    cmd = [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={profile}", f"--window-size=1600,{height}",
           "--virtual-time-budget=8000", f"--screenshot={dest}", url]  # fmt: skip
    for _ in range(4):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        try:
            if proc.wait(60) == 0:
                print(f"{dest}  <-  {url}", flush=True)
                return
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    sys.exit(f"error: chromium did not screenshot {url} in 4 tries")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", help="working folder (its mlflow.db is reused when it has runs)")
    p.add_argument("--out", default=str(ROOT / "docs" / "images"), help="where pictures go")
    p.add_argument("--epochs", type=int, default=2, help="demo training epochs")
    p.add_argument(
        "--sweep-only",
        action="store_true",
        help=f"only the sweep's pictures, of the run {SWEEP!r} already in --work's store",
    )
    args = p.parse_args()
    browser = chromium()
    work = Path(args.work or tempfile.mkdtemp(prefix="shan-ui-")).absolute()
    work.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SHAN_DEMO_DATA": str(work / "demo-data")}
    env.pop("RAY_ADDRESS", None)  # a local Ray instance of the job's own
    if not (work / "mlflow.db").is_file():
        demo_runs(work, env, args.epochs)
        demo_sweep(work, env, args.epochs)
    sweep_exp, parent = find_sweep(uri)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    proc, base = serve(work, uri)
    try:
        with tempfile.TemporaryDirectory(prefix="shan-chromium-") as profile:
            sweep_runs = f"{base}/#/experiments/{sweep_exp}/runs"
            shots = {
                # the parent and its children (their names start with the parent's), nested
                "mlflow_sweep_runs.png": f"{sweep_runs}?searchFilter="
                f"attributes.run_name%20LIKE%20%27{SWEEP}%25%27&",
                "mlflow_sweep_parent.png": f"{sweep_runs}/{parent}",
                "mlflow_sweep_plot.png": f"{sweep_runs}/{parent}/artifacts/sweep.png",
            }
            if not args.sweep_only:
                exp, train, evaluation = find_runs(uri)
                run = f"{base}/#/experiments/{exp}/runs"
                shots = {
                    "mlflow_run_overview.png": f"{run}/{train}",
                    "mlflow_run_metrics.png": f"{run}/{train}/model-metrics",
                    "mlflow_run_system_metrics.png": f"{run}/{train}/system-metrics",
                    "mlflow_eval_plots.png": f"{run}/{evaluation}/artifacts/recall_at_k.png",
                    **shots,
                }
            # a fresh browser remembers no view: the model-training one, as the experiment's
            # kind says (the UI's toggle is kept in the browser or given in the URL)
            for name, url in shots.items():  # the overview down to its "Logged models"
                height = (
                    2500 if name in ("mlflow_run_overview.png", "mlflow_sweep_parent.png") else 1100
                )
                sep = "" if url.endswith("&") else "?"
                shoot(browser, f"{url}{sep}{VIEW}", out / name, Path(profile), height)
    finally:
        stop(proc)
    print(f"store: {uri}")


if __name__ == "__main__":
    main()
