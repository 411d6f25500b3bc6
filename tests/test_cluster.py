"""cluster/: every file parses, every entrypoint is a real job with flags its parser accepts,
the `ray up` config passes Ray's validation, and the local stack runs the whole path."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shan.config import load_config
from shan.eval.job import check_protocol

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
YAMLS = sorted(CLUSTER.rglob("*.yaml"))
JOB_CALL = re.compile(r"python3? (jobs/\w+\.py)((?:(?!&&|;|\|).)*)", re.S)


def documents(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def entrypoints() -> list[tuple[str, str]]:
    """(file, command string) for every command in cluster/ that runs a job."""
    found = []

    def walk(node, where):
        if isinstance(node, dict):
            for v in node.values():
                walk(v, where)
        elif isinstance(node, list):
            for v in node:
                walk(v, where)
        elif isinstance(node, str) and "jobs/" in node:
            found.append((where, node))

    for path in YAMLS:
        for doc in documents(path):
            walk(doc, path.name)
    return found


def load_job(rel: str):
    spec = importlib.util.spec_from_file_location(Path(rel).stem, ROOT / rel)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_file_parses_and_says_how_to_use_it(path):
    assert documents(path)
    assert path.read_text().startswith("#"), "each file starts with a comment on how to use it"


def test_local_sh_and_readme_exist():
    text = (CLUSTER / "local.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash") and "shan.services" in text
    assert os.access(CLUSTER / "local.sh", os.X_OK)


def test_entrypoints_name_jobs_and_flags_their_parsers_accept():
    calls = [(f, m) for f, cmd in entrypoints() for m in JOB_CALL.finditer(cmd)]
    assert {f for f, _ in calls} >= {"rayjob-train.yaml", "eval-cronjob.yaml"}
    for where, m in calls:
        rel, rest = m.group(1), re.sub(r"\$\(?\{?\w+\}?\)?", "x", m.group(2))
        assert (ROOT / rel).is_file(), f"{where}: {rel} does not exist"
        args = load_job(rel).parser().parse_intermixed_args(shlex.split(rest))
        if rel.endswith("train.py"):
            overrides = [o for o in args.overrides if "=" in o]
            load_config(args.config, overrides)  # the config and overrides are valid
        if rel.endswith("evaluate.py"):
            check_protocol(args.protocol)
            assert args.promote, f"{where}: the scheduled evaluation promotes"


def test_cronjob_never_runs_two_at_once_and_reads_secrets():
    (cron,) = documents(CLUSTER / "k8s" / "eval-cronjob.yaml")
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    token = next(e for e in container["env"] if e["name"] == "RAY_AUTH_TOKEN")
    assert "secretKeyRef" in token["valueFrom"]


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def test_image_matches_the_manifests_and_the_pins():
    """The image the manifests run holds the pinned Ray, the project where they look for it,
    and installs with files and extras that exist."""
    assert (CLUSTER / "Dockerfile").read_text().startswith("#")
    steps = dockerfile()
    assert steps[0][0] == "FROM"
    ray_pin = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert steps[0][1].startswith(f"rayproject/ray:{ray_pin}-"), steps[0]
    (cluster,) = documents(CLUSTER / "k8s" / "raycluster.yaml")
    assert cluster["spec"]["rayVersion"] == ray_pin
    workdir = next(a for i, a in steps if i == "WORKDIR")
    usage = (CLUSTER / "Dockerfile").read_text().split("-t ", 1)[1].split()[0]
    containers = [c for path in CLUSTER.rglob("k8s/*.yaml") for doc in documents(path)
                  for c in _containers(doc)]  # fmt: skip
    assert containers and all(c["image"] == usage for c in containers)
    assert all(c.get("workingDir", workdir) == workdir for c in containers)
    for src in [w for i, a in steps if i == "COPY" for w in a.split()[:-1] if "--" not in w]:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    install = next(a for i, a in steps if i == "RUN" and "pip install" in a)
    optional = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    for name in re.search(r'"\.\[([\w,]+)\]"', install).group(1).split(","):
        assert re.search(rf"^{name} = \[", optional.split("\n[")[0], re.M), f"no extra [{name}]"
    assert "-c constraints.txt" in install


def _containers(node):
    """Every container spec (a dict with an image) anywhere in a manifest."""
    if isinstance(node, dict):
        if "image" in node and "name" in node:
            yield node
        for v in node.values():
            yield from _containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _containers(v)


SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|ACCESS_KEY|_URI$|_URL$")


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("k8s/*.yaml")), ids=lambda p: p.name)
def test_manifests_take_secrets_and_addresses_from_kubernetes_secrets(path):
    """No token, key, password or service address is written in a manifest: each such variable
    comes from a Secret (secretKeyRef, or envFrom a secretRef); every container that talks to
    Ray has the token that way."""
    for doc in documents(path):
        for c in _containers(doc):
            env = c.get("env", [])
            literal = [e["name"] for e in env if "value" in e and SECRET_NAME.search(e["name"])]
            assert not literal, f"{path.name}/{c['name']}: written in the file: {literal}"
            from_secret = {e["name"] for e in env if "secretKeyRef" in e.get("valueFrom", {})}
            if "RAY_AUTH_MODE" in {e["name"] for e in env}:
                assert "RAY_AUTH_TOKEN" in from_secret, f"{path.name}/{c['name']}"
            for ref in c.get("envFrom", []):
                assert "secretRef" in ref, f"{path.name}/{c['name']}: envFrom {ref}"
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}|[0-9a-f]{40,}", text), f"{path.name}: a key?"


def test_ray_up_config_passes_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    validate_config(prepare_config(config))
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert config["available_node_types"]["gpu_worker"]["min_workers"] == 0


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

    from shan.services import ray_processes

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


@pytest.mark.integration
def test_local_stack_train_from_s3_evaluate_promote_and_tear_down(tmp_path):
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
        run([*submit, "python", "jobs/train.py", "--config", "tests/configs/tiny.yaml",
             "--data", data, "--name", "e2e", "--register", "shan-e2e", "optim.epochs=1",
             "scaling.num_workers=1", "tracking.storage_path=s3://shan/e2e/runs"], env)  # fmt: skip
        run([*submit, "python", "jobs/evaluate.py", "--model", "models:/shan-e2e/1",
             "--promote", "champion", "--data", data, "--split", "test",
             "--out", "s3://shan/e2e/eval", "--actors", "1", "--tile-images", "16",
             "--tile-captions", "64"], env)  # fmt: skip
        c = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
        assert c.get_model_version_by_alias("shan-e2e", "champion").version == "1"
        from shan.data import fs

        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})
        assert fs.exists("s3://shan/e2e/eval/v1/metrics.json")  # --promote: one folder a version
        assert fs.exists("s3://shan/e2e/runs/e2e")  # Ray Train checkpoints went to S3
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
