"""Several Ray nodes on one Linux machine, for real: each node in its own network namespace.

The head's namespace holds a bridge; every worker node's namespace is joined to it by a veth
pair (``shan0`` inside the node). Addresses are private test addresses (``10.231.0.0/24``)
that exist only inside the namespaces made here: the host's interfaces and routes are never
touched, and nothing listens outside those namespaces. The S3 endpoint (moto) and the MLflow
server run in the head's namespace, on its address; so do the drivers (``run_in_head``).

Root only (``ip netns``). Used by ``tests/integration/test_multinode.py`` and
``benchmarks/multinode.py``; everything started here is stopped by :meth:`NetnsCluster.down`,
by process id, and every namespace made here is deleted (Ray's own ``ray stop`` is never used:
it would stop every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from shan_stack import BUCKET, S3_KEY, S3_SECRET

SUBNET = "10.231.0"
HEAD_IP = f"{SUBNET}.1"
RAY_PORT, DASHBOARD_PORT, S3_PORT, MLFLOW_PORT = 6379, 8265, 9000, 5000
NODE_IF = "shan0"  # the veth end inside a worker node's namespace
BRIDGE = "shanbr0"
ROOT = Path(__file__).resolve().parent.parent


def why_not_here() -> str | None:
    """Why namespaces cannot be made on this machine (None: they can)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add), this is not root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"shan-probe-{secrets.token_hex(3)}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return f"ip netns add failed: {r.stderr.strip()}"
    r = subprocess.run(["ip", "netns", "del", probe], capture_output=True, text=True)
    if r.returncode:
        return f"ip netns del failed: {r.stderr.strip()}"
    return None


def ip(*args: str) -> None:
    """``ip ARGS``; a RuntimeError with ip's message when it fails."""
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


def ns_pids(ns: str) -> list[int]:
    """The processes whose network namespace is ``ns``."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()] if r.returncode == 0 else []


def clean_env() -> dict[str, str]:
    """This process's environment without what points at other services or pins Ray to
    127.0.0.1 (a node in a namespace must take its own address)."""
    drop = ("RAY_", "MLFLOW_", "AWS_")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


@dataclass
class NetnsCluster:
    """A head namespace and worker-node namespaces; what runs in them; how to stop it."""

    state: Path
    tag: str = field(default_factory=lambda: secrets.token_hex(2))
    namespaces: dict[str, str] = field(default_factory=dict)  # node name -> namespace
    addresses: dict[str, str] = field(default_factory=dict)  # node name -> address
    token_path: Path | None = None
    servers: list[subprocess.Popen] = field(default_factory=list)

    def save(self) -> None:
        """``state/cluster.json``: what a driver in the head's namespace needs to act on it
        (and, once it made nodes of its own, what :meth:`down` must stop)."""
        fields = {"tag": self.tag, "namespaces": self.namespaces, "addresses": self.addresses,
                  "token_path": str(self.token_path)}  # fmt: skip
        (self.state / "cluster.json").write_text(json.dumps(fields))

    @classmethod
    def load(cls, state: Path) -> NetnsCluster:
        d = json.loads((state / "cluster.json").read_text())
        return cls(state, d["tag"], d["namespaces"], d["addresses"], Path(d["token_path"]))

    # -- namespaces ----------------------------------------------------------------------------
    def make_head(self) -> None:
        """The head's namespace with the bridge, and the cluster's Ray token."""
        self.token_path = self.state / "ray_auth_token"
        self.token_path.write_text(secrets.token_hex(32))
        self.token_path.chmod(0o600)
        ns = self._add_ns("head")
        ip("-n", ns, "link", "add", BRIDGE, "type", "bridge")
        ip("-n", ns, "addr", "add", f"{HEAD_IP}/24", "dev", BRIDGE)
        ip("-n", ns, "link", "set", BRIDGE, "up")
        self.addresses["head"] = HEAD_IP
        self.save()

    def make_node(self, name: str) -> str:
        """A worker node's namespace joined to the head's bridge; returns its address."""
        ns = self._add_ns(name)
        index = len(self.namespaces) + 9  # .11, .12, ...
        host_end = f"v{self.tag}{index}"
        ip("link", "add", NODE_IF, "netns", ns, "type", "veth", "peer", "name", host_end,
           "netns", self.namespaces["head"])  # fmt: skip
        address = f"{SUBNET}.{index}"
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", NODE_IF)
        ip("-n", ns, "link", "set", NODE_IF, "up")
        ip("-n", self.namespaces["head"], "link", "set", host_end, "master", BRIDGE, "up")
        self.addresses[name] = address
        self.save()
        return address

    def _add_ns(self, name: str) -> str:
        ns = f"shan-{self.tag}-{name}"
        ip("netns", "add", ns)
        self.namespaces[name] = ns
        self.save()  # a driver that makes nodes leaves them known to whoever tears down
        ip("-n", ns, "link", "set", "lo", "up")  # else the head cannot reach its own GCS
        return ns

    # -- processes -----------------------------------------------------------------------------
    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Token authentication with this cluster's token, S3 and MLflow on the head."""
        assert self.token_path is not None
        s3 = f"http://{HEAD_IP}:{S3_PORT}"
        return {
            **clean_env(),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
            "AWS_ENDPOINT_URL": s3,
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "AWS_ACCESS_KEY_ID": S3_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_TRACKING_URI": f"http://{HEAD_IP}:{MLFLOW_PORT}",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(extra or {}),
        }

    def exec_args(self, node: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[node], *cmd]

    def run(self, node: str, *cmd: str, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess:  # fmt: skip
        """``cmd`` in ``node``'s namespace, to its end."""
        return subprocess.run(self.exec_args(node, *cmd), capture_output=True, text=True,
                              env=env or self.env(), timeout=timeout, cwd=ROOT)  # fmt: skip

    def spawn(self, node: str, *cmd: str, log: str,
              env: dict[str, str] | None = None) -> subprocess.Popen:  # fmt: skip
        """``cmd`` started in ``node``'s namespace, its output in ``state/log``."""
        with (self.state / log).open("ab") as out:
            return subprocess.Popen(self.exec_args(node, *cmd), stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env or self.env(), start_new_session=True)  # fmt: skip

    def start_services(self) -> None:
        """S3 (moto, with the bucket) and MLflow (artifacts in S3) on the head's address."""
        py = sys.executable
        self.servers.append(self.spawn("head", py, "-m", "moto.server", "-H", HEAD_IP, "-p",
                                       str(S3_PORT), log="s3.log"))  # fmt: skip
        self.wait_http(f"http://{HEAD_IP}:{S3_PORT}/moto-api/", "s3.log")
        bucket = f"http://{HEAD_IP}:{S3_PORT}/{BUCKET}"
        make_bucket = f"import urllib.request as u; u.urlopen(u.Request('{bucket}', method='PUT'))"
        self._check(self.run("head", py, "-c", make_bucket), "create the bucket")
        self.servers.append(self.spawn(
            "head", py, "-m", "mlflow", "server", "--backend-store-uri",
            f"sqlite:///{self.state.absolute() / 'mlflow.db'}", "--artifacts-destination",
            f"s3://{BUCKET}/mlflow-artifacts", "--host", HEAD_IP, "--port", str(MLFLOW_PORT),
            "--workers", "1", log="mlflow.log",
            env=self.env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}),
        ))  # fmt: skip
        self.wait_http(f"http://{HEAD_IP}:{MLFLOW_PORT}/health", "mlflow.log")

    def wait_http(self, url: str, log: str, timeout: float = 120) -> None:
        probe = f"import urllib.request as u; u.urlopen('{url}', timeout=2)"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run("head", sys.executable, "-c", probe, timeout=30).returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"{url} did not answer in {timeout:g} s: see {self.state / log}")

    def start_head(self) -> None:
        """A Ray head that offers no CPU or GPU to work (as on an autoscaling cluster)."""
        cmd = self._ray_start("head", "--head", "--port", str(RAY_PORT), "--num-cpus", "0",
                              "--num-gpus", "0", "--dashboard-host", HEAD_IP, "--dashboard-port",
                              str(DASHBOARD_PORT))  # fmt: skip
        self._check(self.run("head", *cmd, env=self.env({"GLOO_SOCKET_IFNAME": BRIDGE})),
                    "start the Ray head")  # fmt: skip
        forget_cluster()

    def start_node(self, name: str, cpus: float = 2, token: Path | None = None,
                   timeout: float = 120) -> subprocess.CompletedProcess:  # fmt: skip
        """A Ray worker node in namespace ``name`` (made if new) with ``cpus`` CPUs; ``token``:
        another token file than the cluster's (a node that must not join)."""
        if name not in self.namespaces:
            self.make_node(name)
        cmd = self._ray_start(name, "--address", f"{HEAD_IP}:{RAY_PORT}", "--num-cpus",
                              f"{cpus:g}", "--num-gpus", "0")  # fmt: skip
        extra = {"GLOO_SOCKET_IFNAME": NODE_IF}
        if token is not None:
            extra["RAY_AUTH_TOKEN_PATH"] = str(token)
        r = self.run(name, *cmd, env=self.env(extra), timeout=timeout)
        forget_cluster()
        return r

    def _ray_start(self, node: str, *args: str) -> list[str]:
        temp = Path(tempfile.gettempdir()) / f"shan-{self.tag}-{node}-{secrets.token_hex(2)}"
        with self.state.joinpath("temp_dirs").open("a") as f:
            f.write(f"{temp}\n")
        ray = str(Path(sys.executable).parent / "ray")
        return [ray, "start", *args, "--node-ip-address", self.addresses[node],
                "--temp-dir", str(temp), "--disable-usage-stats"]  # fmt: skip

    def kill_node(self, name: str) -> int:
        """SIGKILL every process of node ``name`` (its raylet, agents and workers): a node
        lost at once. Returns how many there were."""
        pids = ns_pids(self.namespaces[name])
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(pids)

    def run_in_head(self, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess:
        """A driver (a ``ray job submit``, a scenario) in the head's namespace."""
        return self.run("head", *cmd, timeout=timeout)

    # -- teardown ------------------------------------------------------------------------------
    def down(self) -> list[str]:
        """Stop every process in every namespace of this cluster (SIGTERM, then SIGKILL after
        3 s), and any process still using one of its Ray temp dirs; delete the namespaces
        (their veths and the bridge go with them) and the temp dirs. Namespaces made by a
        driver (:meth:`save`) count too. Returns what could not be removed."""
        if (self.state / "cluster.json").exists():
            self.namespaces.update(NetnsCluster.load(self.state).namespaces)
        for ns in namespaces_left(self.tag):
            self.namespaces.setdefault(ns.removeprefix(f"shan-{self.tag}-"), ns)
        for proc in self.servers:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)):
            for ns in self.namespaces.values():
                for pid in ns_pids(ns):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(map(ns_pids, self.namespaces.values())):
                time.sleep(0.2)
        strays = self._strays()
        for p in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        left = [f"{ns}: pids {ns_pids(ns)}" for ns in self.namespaces.values() if ns_pids(ns)]
        for ns in self.namespaces.values():
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if r.returncode:
                left.append(f"{ns}: {r.stderr.strip()}")
        for proc in self.servers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        temp_dirs = self.state / "temp_dirs"
        if temp_dirs.exists():
            for line in temp_dirs.read_text().split():
                shutil.rmtree(line, ignore_errors=True)
        forget_cluster()
        return left

    def _strays(self) -> list[int]:
        """Processes whose command line names one of this cluster's Ray temp dirs."""
        import psutil

        mark = f"{tempfile.gettempdir()}/shan-{self.tag}-"
        found = []
        for p in psutil.process_iter(["cmdline"]):
            if any(mark in part for part in p.info["cmdline"] or []) and p.pid != os.getpid():
                found.append(p.pid)
        return found

    def processes_left(self) -> list[int]:
        """Processes of this cluster still alive: in its namespaces, or using its temp dirs."""
        in_ns = [p for ns in self.namespaces.values() for p in ns_pids(ns)]
        return in_ns + self._strays() + [p.pid for p in self.servers if p.poll() is None]

    @staticmethod
    def _check(r: subprocess.CompletedProcess, what: str) -> None:
        if r.returncode:
            raise RuntimeError(f"could not {what}: {(r.stdout + r.stderr)[-2000:]}")


def forget_cluster() -> None:
    """Remove Ray's record of the namespaced head (``ray start`` writes it to the shared
    /tmp/ray), so that a later ``ray.init()`` elsewhere does not try to join it."""
    record = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    with contextlib.suppress(OSError):
        if record.read_text().strip().endswith(f"{HEAD_IP}:{RAY_PORT}"):
            record.unlink()


def namespaces_left(tag: str) -> list[str]:
    """Namespaces of cluster ``tag`` that still exist."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if f"shan-{tag}-" in line]
