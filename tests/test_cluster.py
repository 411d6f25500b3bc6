"""cluster/: every file parses, every entrypoint is a real job with flags its parser accepts,
the `ray up` config passes Ray's validation, MLflow asks for a password and only the jobs' pods
reach it (with no secret on a command line), and the local stack runs the whole path."""

from __future__ import annotations

import configparser
import contextlib
import importlib.util
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


# -- MLflow behind authentication, reachable from the jobs' pods only -----------------------------
K8S = CLUSTER / "k8s"
JOB_MANIFESTS = ("raycluster.yaml", "rayjob-train.yaml", "eval-cronjob.yaml")
CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
URI_WITH_CREDENTIALS = re.compile(r"\b[a-z][\w+.-]*://[^\s/@:]+:[^\s/@]+@")
LITERAL_SECRET = re.compile(r"(PASSWORD|TOKEN|SECRET\w*|ACCESS_KEY\w*)=(?![\"']?\$)\S")


def one(docs: list, kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


def pod_templates(node):
    """Every pod template (metadata and a spec with containers) anywhere in a manifest."""
    if isinstance(node, dict):
        if isinstance(node.get("spec"), dict) and "containers" in node["spec"]:
            yield node
        for v in node.values():
            yield from pod_templates(v)
    elif isinstance(node, list):
        for v in node:
            yield from pod_templates(v)


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


def from_secret(e: dict | None) -> bool:
    return bool(e) and "secretKeyRef" in e.get("valueFrom", {})


def selects(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"only matchLabels is checked here: {selector}"
    return bool(selector.get("matchLabels")) and selector["matchLabels"].items() <= labels.items()


def mlflow_deployment() -> tuple[dict, dict, str]:
    """The MLflow Deployment, its container, and the script its `bash -c` runs."""
    dep = one(documents(K8S / "mlflow.yaml"), "Deployment")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["bash", "-c"] and len(c["args"]) == 1, c["command"]
    return dep, c, c["args"][0]


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
    extras = re.findall(r"\.\[([\w,]+)\]", install)
    wanted = [r for e in extras for x in e.split(",") for r in pyproject["project"][
        "optional-dependencies"][x]]  # fmt: skip
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


def command_lines():
    """(where, text, secret variables) of every command line in cluster/: each container's
    command and args, and the commands `ray up` runs on the nodes."""
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path):
            for c in _containers(doc):
                secret = {n for n, e in env_of(c).items() if from_secret(e)}
                for text in c.get("command", []) + c.get("args", []):
                    yield f"{path.name}/{c['name']}", text, secret
    config = yaml.safe_load((CLUSTER / "ray-up.yaml").read_text())
    for key in [k for k in config if k.endswith("_commands")]:
        for text in config[key]:
            yield f"ray-up.yaml/{key}", text, set()


def test_no_secret_reaches_a_command_line():
    """No password, token or URI with credentials is written in a command line, and no variable
    that holds one is expanded into a program's arguments (where `ps` shows it): only bash
    builtins (printf, echo) may use them, and `VAR=$SECRET program` passes them as environment."""
    seen = set()
    for where, text, secret_vars in command_lines():
        seen.add(where)
        assert not URI_WITH_CREDENTIALS.search(text), f"{where}: a URI with credentials"
        assert not LITERAL_SECRET.search(text), f"{where}: {LITERAL_SECRET.search(text)[0]}"

        def is_secret(var):
            return var in secret_vars or SECRET_NAME.search(var)  # noqa: B023

        expanded = [v for v in re.findall(r"\$\((\w+)\)", text) if is_secret(v)]
        assert not expanded, f"{where}: Kubernetes puts $({expanded[0]}) into the arguments"
        for cmd in re.split(r"\n|;|&&|\|\|?", re.sub(r"\\\n", " ", text)):
            words = cmd.split()
            while words and re.fullmatch(r"\w+=\S*", words[0]):
                words.pop(0)  # VAR=value program: the value goes to the environment
            refs = {v for v in re.findall(r"\$\{?(\w+)", " ".join(words)) if is_secret(v)}
            if refs:
                assert words[0] in ("printf", "echo"), f"{where}: {refs} in the args of {cmd!r}"
    assert {"mlflow.yaml/mlflow", "eval-cronjob.yaml/submit"} <= seen
    assert any(w.startswith("ray-up.yaml/") for w in seen)
    for path in [*sorted(K8S.glob("*.yaml")), CLUSTER / "ray-up.yaml", CLUSTER / "Dockerfile"]:
        assert not URI_WITH_CREDENTIALS.search(path.read_text()), f"{path.name}: credentials"


def test_mlflow_is_reachable_only_from_the_job_pods():
    """A NetworkPolicy selects the MLflow pods and admits, on the MLflow port only, the pods of
    the RayCluster (head, workers), the RayJob's submitter and the evaluation CronJob, by labels
    their pod templates really carry; nothing else (no IP blocks, no other namespaces)."""
    docs = documents(K8S / "mlflow.yaml")
    dep, svc, policy = (one(docs, k) for k in ("Deployment", "Service", "NetworkPolicy"))
    _, c, _ = mlflow_deployment()
    server_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert selects(policy["spec"]["podSelector"], server_labels)
    assert selects({"matchLabels": svc["spec"]["selector"]}, server_labels)
    (port,) = [p["containerPort"] for p in c["ports"]]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [port]
    assert "Ingress" in policy["spec"]["policyTypes"]
    admitted = []
    assert policy["spec"].get("ingress"), "no ingress rule: nobody reaches MLflow"
    for rule in policy["spec"]["ingress"]:
        assert rule.get("ports") == [{"protocol": "TCP", "port": port}], rule.get("ports")
        assert rule.get("from"), "a rule without `from` admits every source"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"pods of this namespace only: {peer}"
            admitted.append(peer["podSelector"])
    templates = [
        (n, t) for n in JOB_MANIFESTS for d in documents(K8S / n) for t in pod_templates(d)
    ]
    pods = {
        f"{n}#{i}": t.get("metadata", {}).get("labels", {}) for i, (n, t) in enumerate(templates)
    }
    assert len(pods) == 4, pods  # head, GPU workers, training submitter, evaluation
    for where, labels in pods.items():
        assert any(selects(s, labels) for s in admitted), f"{where} {labels} cannot reach MLflow"
    assert not any(selects(s, server_labels) for s in admitted)


def test_every_job_container_has_the_mlflow_user_from_a_secret():
    """MLflow's standard variables MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, from
    one Secret, in every container of the RayCluster, the RayJob and the CronJob, beside the
    tracking URI."""
    from mlflow.environment_variables import MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_USERNAME

    assert (MLFLOW_TRACKING_USERNAME.name, MLFLOW_TRACKING_PASSWORD.name) == CREDENTIALS
    containers = [(n, c) for n in JOB_MANIFESTS for d in documents(K8S / n) for c in _containers(d)]
    assert len(containers) == 4
    refs = set()
    for name, c in containers:
        env = env_of(c)
        for var in CREDENTIALS:
            assert from_secret(env.get(var)), f"{name}/{c['name']}: {var} not from a Secret"
            ref = env[var]["valueFrom"]["secretKeyRef"]
            refs.add((var, ref["name"], ref["key"]))
        assert {"secretRef": {"name": "shan-mlflow"}} in c.get("envFrom", []), f"{name}: URI"
    assert len(refs) == 2 and len({n for _, n, _ in refs}) == 1, f"one MLflow user: {refs}"


def readme_secrets() -> dict[str, set[str]]:
    """Secret -> keys, from the `kubectl create secret generic` commands of cluster/README.md
    (the keys of an --from-env-file are the `# KEY=` lines of the same block)."""
    out = {}
    for block in re.findall(r"```bash\n(.*?)```", (CLUSTER / "README.md").read_text(), re.S):
        env_file_keys = set(re.findall(r"^#\s+(\w+)=", block, re.M))
        for line in re.sub(r"\\\n", " ", block).splitlines():
            if m := re.match(r"kubectl create secret generic (\S+)(.*)", line):
                keys = set(re.findall(r"--from-literal=(\w+)=", m.group(2)))
                out[m.group(1)] = keys | (env_file_keys if "--from-env-file" in line else set())
    return out


def test_every_secret_the_manifests_read_is_documented_with_its_keys():
    documented = readme_secrets()
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path):
            for c in _containers(doc):
                for e in c.get("env", []):
                    if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                        keys = documented.get(ref["name"], set())
                        assert ref["key"] in keys, f"{path.name}/{c['name']}: {ref} not in README"
                for r in c.get("envFrom", []):
                    assert r["secretRef"]["name"] in documented, f"{path.name}: {r}"


def test_ray_up_nodes_read_the_mlflow_user_from_a_private_file():
    """`ray up`: the start commands export ~/.shan/env (mode 600, says the comment) into Ray;
    nothing holds the MLflow password in the config itself."""
    text = (CLUSTER / "ray-up.yaml").read_text()
    config = yaml.safe_load(text)
    head = text.split("\ncluster_name:")[0]
    assert all(v in head for v in CREDENTIALS) and "mode 600" in head
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert re.search(r"set -a; \. ~/\.shan/env; set \+a; fi;.*ray start", start, re.S), start


@pytest.mark.integration
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


@pytest.mark.integration
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

        for k, v in env.items():  # this stack's S3, for this test only (not the session's)
            if k.startswith("AWS_"):
                monkeypatch.setenv(k, v)
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
