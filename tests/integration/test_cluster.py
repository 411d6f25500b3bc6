"""cluster/ against the installed MLflow and for real: the MLflow Deployment runs the basic-auth
app with the settings the installed MLflow reads (importing ``mlflow.cli`` alone takes seconds),
its own start script guards MLflow (no secret on a command line), and the local stack
(``cluster/local.sh``) runs the whole path: data to S3, a submitted training, a submitted
evaluation that promotes, and a clean teardown."""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from tests.helpers import ROOT
from tests.unit.test_cluster import (
    CLUSTER,
    K8S,
    dockerfile,
    env_of,
    from_secret,
    install_extras,
    mlflow_deployment,
)


def test_mlflow_server_runs_basic_auth_with_secrets_from_the_environment(tmp_path):
    """`mlflow server --app-name basic-auth`, with every secret in the environment under the
    names the installed MLflow reads; the auth config file the container writes before the
    server starts denies by default and holds the auth database URI as given."""
    from mlflow import environment_variables as mev
    from mlflow.cli import server

    dep, c, script = mlflow_deployment()
    call = re.search(r"^exec mlflow server\b(.*)", re.sub(r"\\\n", " ", script), re.M)
    assert call, script
    argv = shlex.split(call.group(1))
    assert argv[argv.index("--app-name") + 1] == "basic-auth"
    envvar = {p.name: p.envvar for p in server.params}
    env = env_of(c)
    assert not {"--backend-store-uri", "--registry-store-uri"} & set(argv)
    assert from_secret(env.get(envvar["backend_store_uri"])), envvar["backend_store_uri"]
    admin = (mev.MLFLOW_AUTH_ADMIN_USERNAME, mev.MLFLOW_AUTH_ADMIN_PASSWORD)
    for var in (*admin, mev.MLFLOW_FLASK_SERVER_SECRET_KEY):
        assert from_secret(env.get(var.name)), f"{var.name} not from a Secret"

    # the auth config file: in a memory-backed volume of this container, written by the script
    path = env[mev.MLFLOW_AUTH_CONFIG_PATH.name]["value"]
    (volume,) = [m["name"] for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes[volume]["emptyDir"]["medium"] == "Memory"
    source = re.search(r"database_uri = \$\{?(\w+)", script).group(1)
    assert from_secret(env.get(source)), f"{source} not from a Secret"
    uri = "postgresql://mlflow:p%40ss%25@db:5432/mlflow_auth?sslmode=require"
    ini = tmp_path / "basic_auth.ini"
    given = {k: "x" for k, e in env.items() if from_secret(e)} | {source: uri}
    r = subprocess.run(["bash", "-c", script.split("exec mlflow server")[0]], text=True,
                       capture_output=True, timeout=30, env={"PATH": os.environ["PATH"], **given,
                       mev.MLFLOW_AUTH_CONFIG_PATH.name: str(ini)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert ini.stat().st_mode & 0o777 == 0o600
    config = configparser.ConfigParser()  # as mlflow.server.auth.config reads it
    config.read(ini)
    auth = config["mlflow"]
    assert auth["database_uri"] == uri
    assert auth["default_permission"] == "NO_PERMISSIONS"
    assert auth["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"
    assert "admin_password" not in auth, "the admin password comes from the environment"
    import mlflow

    shipped = (Path(mlflow.__file__).parent / "server" / "auth" / "basic_auth.ini").read_text()
    known = set(re.findall(r"^#?\s*(\w+)\s*=", shipped, re.M))
    assert set(auth) <= known, f"keys MLflow does not read: {set(auth) - known}"

    # the basic-auth app needs Flask-WTF (mlflow[auth]) in the image the Deployment runs
    install = next(a for i, a in dockerfile() if i == "RUN" and "pip install" in a)
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    optional = pyproject["project"]["optional-dependencies"]
    wanted = [r for x in install_extras(install) for r in optional[x]]
    assert any(re.match(r"(mlflow\[auth\]|flask-wtf)", r, re.I) for r in wanted), wanted


def test_mlflow_server_answers_the_address_the_jobs_use():
    """MLflow's DNS-rebinding check (Host header) admits the Service address the jobs are given
    and localhost (kubectl port-forward), nothing else."""
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    _, c, _ = mlflow_deployment()
    var = {p.name: p.envvar for p in server.params}["allowed_hosts"]
    allowed = [h.strip() for h in env_of(c)[var]["value"].split(",")]
    texts = [(CLUSTER / "README.md").read_text(), *(p.read_text() for p in K8S.glob("*.yaml"))]
    uris = {u for t in texts for u in re.findall(r"MLFLOW_TRACKING_URI=(https?://[\w.:-]+)", t)}
    assert uris
    for host in [urlparse(u).netloc for u in uris] + ["localhost:5000", "127.0.0.1:5000"]:
        assert is_allowed_host_header(allowed, host), host
    for host in ["evil.example.com", "shan-mlflow.evil.example.com:5000", "10.1.2.3:5000"]:
        assert not is_allowed_host_header(allowed, host), host


def test_mlflow_start_script_of_the_manifest_guards_mlflow(tmp_path, monkeypatch):
    """The Deployment's own script, run here with SQLite for PostgreSQL and a folder for S3:
    no request passes without a password, the jobs' user owns what it creates and nobody else
    sees it, and no secret is on the command line of any of the server's processes."""
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF)")
    import secrets

    import psutil
    import requests
    from mlflow.server import get_app_client
    from mlflow.tracking import MlflowClient
    from shan_stack import free_port, wait_http

    _, c, script = mlflow_deployment()
    port = free_port()
    script = script.replace("s3://your-bucket/mlflow-artifacts", str(tmp_path / "artifacts"))
    script = script.replace("0.0.0.0", "127.0.0.1").replace("--port 5000", f"--port {port}")
    given = {
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "SHAN_AUTH_DATABASE_URI": f"sqlite:///{tmp_path / 'auth.db'}",
        "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets.token_hex(16),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }
    assert set(given) == {n for n, e in env_of(c).items() if from_secret(e)}
    literal = {n: e["value"] for n, e in env_of(c).items() if "value" in e}
    literal["MLFLOW_AUTH_CONFIG_PATH"] = str(tmp_path / "basic_auth.ini")
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    log = (tmp_path / "mlflow.log").open("wb")
    env = clean_env(**literal, **given, PATH=path)
    proc = subprocess.Popen(["bash", "-c", script], stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", 120, proc, tmp_path / "mlflow.log")
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=5"
        assert requests.get(search, timeout=10).status_code == 401
        admin = ("admin", given["MLFLOW_AUTH_ADMIN_PASSWORD"])
        assert requests.get(search, auth=("admin", "wrong"), timeout=10).status_code == 401
        host = {"Host": "shan-mlflow.default.svc:5000"}
        assert requests.get(search, auth=admin, headers=host, timeout=10).status_code == 200
        cmdlines = [" ".join(p.cmdline()) for p in [psutil.Process(proc.pid),
                    *psutil.Process(proc.pid).children(recursive=True)]]  # fmt: skip
        assert any("basic-auth" in cl for cl in cmdlines), cmdlines
        for value in given.values():
            assert not any(value in cl for cl in cmdlines), "a secret on a command line"

        users = {"shan-jobs": secrets.token_hex(12), "alice": secrets.token_hex(12)}
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        for user, password in users.items():
            get_app_client("basic-auth", tracking_uri=url).create_user(user, password)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "shan-jobs")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", users["shan-jobs"])
        jobs = MlflowClient(tracking_uri=url)
        run = jobs.create_run(jobs.create_experiment("shan"))
        jobs.log_metric(run.info.run_id, "rsum", 1.0)
        jobs.create_registered_model("shan-f30k")
        v = jobs.create_model_version("shan-f30k", f"runs:/{run.info.run_id}/m", run.info.run_id)
        jobs.set_registered_model_alias("shan-f30k", "champion", v.version)
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", users["alice"])
        alice = MlflowClient(tracking_uri=url)
        assert "shan" not in [e.name for e in alice.search_experiments()]
        with pytest.raises(Exception, match="403|PERMISSION_DENIED|Permission denied"):
            alice.get_run(run.info.run_id)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


# -- the local stack, end to end ------------------------------------------------------------------
def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the settings of other stacks (the test session's)."""
    drop = ("RAY_", "MLFLOW_", "AWS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)} | extra


def run(cmd: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                       env={**clean_env(), **env})  # fmt: skip
    assert r.returncode == 0, f"{cmd[:4]}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def read_env(state: Path) -> dict[str, str]:
    pairs = [line[len("export ") :].split("=", 1) for line in (state / "env.sh").read_text()
             .splitlines() if line.startswith("export ")]  # fmt: skip
    return dict(pairs)


def stack_pids(services: dict, env: dict) -> set[int]:
    """Every live process of a local stack: S3, MLflow, the Ray head's processes (found by its
    GCS port), and all their descendants (Ray's workers and agents, the servers' workers)."""
    import psutil
    from shan_stack import ray_processes

    roots = {services["pids"]["s3"], services["pids"]["mlflow"]}
    roots |= {p.pid for p in ray_processes(env["RAY_ADDRESS"])}
    pids = set(roots)
    for pid in roots:
        with contextlib.suppress(psutil.Error):
            pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
    return pids


def listening(pids: set[int]) -> dict[str, list[str]]:
    """Listening sockets of ``pids``: address -> ["process:port", ...]."""
    import psutil

    out: dict[str, list[str]] = {}
    for c in psutil.net_connections(kind="inet"):
        if c.status == psutil.CONN_LISTEN and c.pid in pids:
            with contextlib.suppress(psutil.Error):
                name = psutil.Process(c.pid).name()
                out.setdefault(c.laddr.ip, []).append(f"{name}:{c.laddr.port}")
    return out


LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1"}


def assert_loopback_only(pids: set[int]) -> None:
    addrs = listening(pids)
    assert addrs, "no listening socket found: the check looks at the wrong processes"
    beyond = {a: who for a, who in addrs.items() if a not in LOOPBACK}
    assert not beyond, f"listening beyond 127.0.0.1: {beyond}"


def test_local_stack_train_from_s3_evaluate_promote_and_tear_down(tmp_path, monkeypatch):
    import psutil
    from mlflow.tracking import MlflowClient

    state = tmp_path / "state"
    local = str(CLUSTER / "local.sh")
    run([local, "up", "--state", str(state), "--num-cpus", "2"], {"PYTHON": sys.executable})
    env = read_env(state)
    services = json.loads((state / "services.json").read_text())
    try:
        # S3, MLflow, and every Ray process (GCS, raylet, dashboard, agents, workers)
        before = stack_pids(services, env)
        assert len(before) >= 6, before
        assert_loopback_only(before)
        assert env["RAY_DASHBOARD_ADDRESS"].startswith("http://127.0.0.1:")
        data = "s3://shan/e2e/data"
        run([sys.executable, "jobs/prepare_data.py", "synthetic", "--out", data, "--train", "160",
             "--dev", "40", "--test", "40", "--regions", "6", "--feature-dim", "16",
             "--concepts", "30"], env)  # fmt: skip
        submit = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address",
                  env["RAY_DASHBOARD_ADDRESS"], "--working-dir", ".", "--"]  # fmt: skip
        # a registered model version (a submitted training from S3: test_multinode)
        register_untrained(env, data, tmp_path)
        run([*submit, "python", "jobs/evaluate.py", "--model", "models:/shan-e2e/1",
             "--promote", "champion", "--data", data, "--split", "test",
             "--out", "s3://shan/e2e/eval", "--actors", "1", "--tile-images", "16",
             "--tile-captions", "64"], env)  # fmt: skip
        c = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        assert c.get_model_version_by_alias("shan-e2e", "champion").version == "1"
        from shan.data import fs

        for k, v in env.items():  # this stack's S3, for this test only (not the session's)
            if k.startswith("AWS_"):
                monkeypatch.setenv(k, v)
        assert fs.exists("s3://shan/e2e/eval/v1/metrics.json")  # --promote: one folder a version
        _no_secrets_in_mlflow(c, env, tmp_path)
        assert_loopback_only(stack_pids(services, env))  # and the workers the jobs started
    finally:
        subprocess.run([local, "down", "--state", str(state)], timeout=180,
                       env=clean_env(PYTHON=sys.executable))  # fmt: skip
    time.sleep(2)
    gcs = env.get("RAY_ADDRESS", "unset")
    port = gcs.rsplit(":", 1)[-1]
    left = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if f"-address={env.get('RAY_ADDRESS')}" in " ".join(p.info["cmdline"] or [])
        or re.search(rf"--gcs[-_]address=\S*:{port}\b", " ".join(p.info["cmdline"] or []))
    ]
    assert not left, f"processes of the local stack are still running: {left}"
    for name in ("s3", "mlflow"):
        assert not psutil.pid_exists(services["pids"][name])


def register_untrained(env: dict, data: str, tmp_path: Path) -> None:
    """Version 1 of ``shan-e2e``: an untrained checkpoint of ``data``'s vocabulary, logged to
    a run of the stack's MLflow (artifacts in its S3) and registered in the plain-checkpoint
    layout of runs before the MLflow model (evaluation reads both layouts)."""
    from mlflow.tracking import MlflowClient

    from shan.data.format import load_vocab
    from tests.helpers import register_checkpoint, save_untrained

    with contextlib.ExitStack() as stack:
        saved = dict(os.environ)
        stack.callback(lambda: (os.environ.clear(), os.environ.update(saved)))
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        ckpt = save_untrained(tmp_path / "ckpt", load_vocab(data))
        c = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        exp = c.create_experiment("shan-e2e")
        rid = c.create_run(exp, run_name="e2e").info.run_id
        c.log_artifacts(rid, str(ckpt), artifact_path="checkpoint")
        c.set_terminated(rid)
        assert register_checkpoint(c, rid, "shan-e2e") == "1"


def _no_secrets_in_mlflow(c, env: dict, tmp_path: Path) -> None:
    import mlflow

    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    secrets = [env["AWS_SECRET_ACCESS_KEY"], env["AWS_ACCESS_KEY_ID"], token]
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()])
    assert len(runs) >= 2
    for r in runs:
        text = json.dumps({"params": r.data.params, "tags": r.data.tags})
        assert not any(s in text for s in secrets), f"a secret in run {r.info.run_id}"
        where = mlflow.artifacts.download_artifacts(
            run_id=r.info.run_id, dst_path=str(tmp_path / r.info.run_id),
            tracking_uri=env["MLFLOW_TRACKING_URI"])  # fmt: skip
        for f in Path(where).rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert not any(s.encode() in data for s in secrets), f"a secret in {f}"
