"""Start and stop, on 127.0.0.1, the pieces the jobs talk to: a Ray head (token auth on, with
its dashboard and job server), an MLflow tracking server, and an S3 endpoint (moto's server).

Used by ``cluster/local.sh`` and by the integration tests::

    python cluster/shan_stack.py up [--state DIR]     # prints the variables to export
    python cluster/shan_stack.py down [--state DIR]

State (logs, the Ray token, the MLflow store, ``env.sh``, pids) lives in ``DIR``
(default ``.local/``). Every process is started by this module and stopped by ``down``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shan.runtime import RAY_LOOPBACK, keep_ray_on_loopback  # noqa: F401 (tests import it here)

HOST = "127.0.0.1"
S3_KEY, S3_SECRET = "shan-local-key", "shan-local-secret"  # moto accepts any credentials
BUCKET = "shan"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(
    url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None
) -> None:
    """Poll ``url`` until it answers 2xx; fail early if ``proc`` exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = Path(log).read_text()[-2000:] if log else ""
            raise RuntimeError(f"process for {url} exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if 200 <= r.status < 300:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


@dataclass
class LocalServices:
    """Addresses, variables and pids of a running local stack."""

    state: str
    env: dict[str, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    def save(self) -> None:
        Path(self.state, "services.json").write_text(json.dumps(asdict(self), indent=2))
        lines = [f"export {k}={v}" for k, v in self.env.items()]
        Path(self.state, "env.sh").write_text("\n".join(lines) + "\n")

    @classmethod
    def load(cls, state: str) -> LocalServices | None:
        p = Path(state, "services.json")
        return cls(**json.loads(p.read_text())) if p.is_file() else None


def _spawn(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **env},
        start_new_session=True,
    )


def start_s3(state: Path) -> tuple[dict[str, str], int]:
    port = free_port()
    cmd = [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)]
    proc = _spawn(cmd, state / "s3.log", {})
    url = f"http://{HOST}:{port}"
    wait_http(f"{url}/moto-api/", 60, proc, state / "s3.log")
    env = {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": S3_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "MLFLOW_S3_ENDPOINT_URL": url,
    }
    _create_bucket(url, BUCKET)
    return env, proc.pid


def _create_bucket(url: str, bucket: str) -> None:
    req = urllib.request.Request(f"{url}/{bucket}", method="PUT")
    with urllib.request.urlopen(req, timeout=10):
        pass


def start_mlflow(state: Path, s3_env: dict[str, str] | None) -> tuple[dict[str, str], int]:
    port = free_port()
    root = state.absolute()
    artifacts = f"s3://{BUCKET}/mlflow-artifacts" if s3_env else str(root / "mlartifacts")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        artifacts,
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(s3_env or {})}
    proc = _spawn(cmd, state / "mlflow.log", env)
    url = f"http://{HOST}:{port}"
    wait_http(f"{url}/health", 120, proc, state / "mlflow.log")
    return {"MLFLOW_TRACKING_URI": url}, proc.pid


def ray_env(state: Path) -> dict[str, str]:
    """Token authentication, with the token of ``RAY_AUTH_TOKEN_PATH`` when that file exists
    (so that a process that already uses it can talk to this head), else a new one; and Ray on
    127.0.0.1 only (``RAY_LOOPBACK``, exported too, so that a driver started from the shell
    takes the node's 127.0.0.1 address as its own)."""
    token = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not (token and Path(token).is_file()):
        new = state / "ray_auth_token"
        if not new.is_file():
            new.write_text(secrets.token_hex(32))
            new.chmod(0o600)
        token = str(new.absolute())
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token, **RAY_LOOPBACK}


def start_ray(state: Path, num_cpus: int | None, node_env: dict[str, str]) -> dict[str, str]:
    """A head whose processes (and so submitted jobs) see ``node_env`` (S3, MLflow)."""
    env = ray_env(state)
    port, dash = free_port(), free_port()
    cmd = [
        shutil.which("ray") or str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--node-ip-address",
        HOST,
        "--port",
        str(port),
        "--dashboard-host",
        HOST,
        "--dashboard-port",
        str(dash),
        "--disable-usage-stats",
        # free ports instead of Ray's fixed defaults, so that a second stack (or one still
        # shutting down) never leaves this head without its job agent
        "--dashboard-agent-listen-port",
        str(free_port()),
        "--ray-client-server-port",
        str(free_port()),
    ]
    if num_cpus:
        cmd += ["--num-cpus", str(num_cpus)]
    # Jobs submitted to this head run `python` from this interpreter's environment.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    with (state / "ray.log").open("ab") as log:
        subprocess.run(
            cmd,
            check=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **node_env, **env, "PATH": path},
            timeout=180,
        )
    env["RAY_ADDRESS"] = f"{HOST}:{port}"
    env["RAY_DASHBOARD_ADDRESS"] = f"http://{HOST}:{dash}"
    return env


def up(
    state: str = ".local",
    ray: bool = True,
    mlflow: bool = True,
    s3: bool = True,
    num_cpus: int | None = None,
) -> LocalServices:
    """Start the chosen services; returns their variables (also written to ``state/env.sh``)."""
    st = Path(state)
    st.mkdir(parents=True, exist_ok=True)
    existing = LocalServices.load(state)
    if existing and any(_alive(p) for p in existing.pids.values()):
        raise RuntimeError(f"services from {state} are still running; run 'down' first")
    svc = LocalServices(state=str(st.absolute()))
    try:
        s3_env = None
        if s3:
            s3_env, svc.pids["s3"] = start_s3(st)
            svc.env.update(s3_env)
        if mlflow:
            env, svc.pids["mlflow"] = start_mlflow(st, s3_env)
            svc.env.update(env)
        if ray:
            svc.env.update(start_ray(st, num_cpus, dict(svc.env)))
            svc.pids["ray"] = -1  # stopped with `ray stop`
    except BaseException:
        svc.save()
        down(state)
        raise
    svc.save()
    return svc


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: a process that exited and waits to be reaped (a zombie: a child
    of ours, or an orphan of an init that does not reap) has stopped."""
    if pid <= 0:
        return False
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # ours: reap it
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def ray_processes(address: str) -> list:
    """The processes of the head at ``address`` (psutil): those whose command line names its GCS
    port (Ray may name the node by another IP than 127.0.0.1); not their workers."""
    import psutil

    port = address.rsplit(":", 1)[-1]
    if not port.isdigit():
        return []
    mark = re.compile(
        rf"(--gcs[-_]address=\S*:{port}\b|--gcs_server_port={port}\b|--address=\S*:{port}\b)"
    )
    return [
        p
        for p in psutil.process_iter(["cmdline"])
        if mark.search(" ".join(p.info["cmdline"] or [])) and p.pid != os.getpid()
    ]


def _stop_ray(address: str) -> None:
    """Stop this head's processes only (``ray stop`` would stop every Ray on the machine);
    their workers follow them."""
    import psutil

    procs = ray_processes(address)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    # the GCS and raylet of Ray 2.60 let SIGTERM wait (ray stop waits 16 s, then kills); the
    # head holds nothing that outlives it, so 5 s is grace enough
    deadline = time.time() + 5
    while time.time() < deadline and any(_alive(p.pid) for p in procs):
        time.sleep(0.2)
    for p in procs:
        if _alive(p.pid):
            with contextlib.suppress(psutil.Error):
                p.kill()


def _forget_cluster(address: str) -> None:
    """Remove Ray's record of this head (what `ray stop` would), so that a later
    ``ray.init()`` does not try to join a cluster that is gone."""
    port = address.rsplit(":", 1)[-1]
    record = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    with contextlib.suppress(OSError):
        if port and record.read_text().strip().endswith(f":{port}"):
            record.unlink()


def _signal_groups(pids: list[int], sig: int) -> None:
    """Send ``sig`` to the process group of each live pid (each server runs in its own)."""
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(OSError):
                os.killpg(pid, sig)


def down(state: str = ".local") -> None:
    """Stop everything ``up`` started from ``state``."""
    svc = LocalServices.load(state)
    if svc is None:
        return
    if "ray" in svc.pids:
        _stop_ray(svc.env.get("RAY_ADDRESS", ""))
        _forget_cluster(svc.env.get("RAY_ADDRESS", ""))
    others = [pid for name, pid in svc.pids.items() if name != "ray"]
    _signal_groups(others, signal.SIGTERM)
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(p) for p in others):
        time.sleep(0.2)
    _signal_groups(others, signal.SIGKILL)
    Path(state, "services.json").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["up", "down", "env"])
    p.add_argument("--state", default=".local", help="folder for logs, token, stores")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the Ray head offers")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--no-mlflow", action="store_true")
    p.add_argument("--no-s3", action="store_true")
    args = p.parse_args(argv)
    if args.command == "down":
        down(args.state)
        print(f"stopped the services of {args.state}")
        return
    if args.command == "up":
        svc = up(args.state, not args.no_ray, not args.no_mlflow, not args.no_s3, args.num_cpus)
    else:
        svc = LocalServices.load(args.state)
        if svc is None:
            sys.exit(f"no services recorded in {args.state}")
    for k, v in svc.env.items():
        print(f"export {k}={v}")
    print(f"# or: source {Path(svc.state, 'env.sh')}", file=sys.stderr)


if __name__ == "__main__":
    main()
