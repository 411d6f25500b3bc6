"""cluster/, read: every file parses, every entrypoint is a real job with flags its parser
accepts, the image matches the manifests, the `ray up` config passes Ray's validation, secrets
come from Kubernetes Secrets and never reach a command line, and only the jobs' pods reach
MLflow. Running MLflow's own settings and the local stack is ``tests/integration/test_cluster.py``.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml

from shan.config import load_config
from shan.eval.job import EvalOptions
from tests.helpers import ROOT, known_flags

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
    """The command-line module of ``jobs/<job>.py``: the shim runs ``shan_cli.<job>``."""
    return importlib.import_module(f"shan_cli.{Path(rel).stem}")


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_cluster_file_parses_and_says_how_to_use_it(path):
    assert documents(path)
    assert path.read_text().startswith("#"), "each file starts with a comment on how to use it"


def test_local_sh_and_readme_exist():
    text = (CLUSTER / "local.sh").read_text()
    assert text.startswith("#!/usr/bin/env bash") and "cluster/shan_stack.py" in text
    assert os.access(CLUSTER / "local.sh", os.X_OK)


def test_entrypoints_name_jobs_and_flags_their_parsers_accept():
    calls = [(f, m) for f, cmd in entrypoints() for m in JOB_CALL.finditer(cmd)]
    assert {f for f, _ in calls} >= {"rayjob-train.yaml", "eval-cronjob.yaml"}
    for where, m in calls:
        rel, rest = m.group(1), re.sub(r"\$\(?\{?\w+\}?\)?", "x", m.group(2))
        assert (ROOT / rel).is_file(), f"{where}: {rel} does not exist"
        parser = load_job(rel).parser()
        args = parser.parse_intermixed_args(known_flags(parser, shlex.split(rest)))
        if rel.endswith("train.py"):
            overrides = [o for o in args.overrides if "=" in o]
            load_config(args.config, overrides)  # the config and overrides are valid
        if rel.endswith("evaluate.py"):
            EvalOptions(protocol=args.protocol).check()
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


def install_extras(install: str) -> list[str]:
    """The extras of the project's ``pip install`` (``".[a,b]"`` or ``"<wheel>[a,b]"``)."""
    m = re.search(r'\[([\w,]+)\]"', install)
    assert m, f"no extras in {install!r}"
    return m.group(1).split(",")


def test_image_matches_the_manifests_and_the_pins():
    """The image the manifests run holds the pinned Ray (every stage), the jobs where they look
    for them, and installs with files and extras that exist."""
    assert (CLUSTER / "Dockerfile").read_text().startswith("#")
    steps = dockerfile()
    assert steps[0][0] == "FROM"
    ray_pin = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    for stage in [a for i, a in steps if i == "FROM"]:
        assert stage.startswith(f"rayproject/ray:{ray_pin}-"), stage
    (cluster,) = documents(CLUSTER / "k8s" / "raycluster.yaml")
    assert cluster["spec"]["rayVersion"] == ray_pin
    workdir = [a for i, a in steps if i == "WORKDIR"][-1]  # the image's (the last stage's)
    usage = (CLUSTER / "Dockerfile").read_text().split("-t ", 1)[1].split()[0]
    containers = [c for path in CLUSTER.rglob("k8s/*.yaml") for doc in documents(path)
                  for c in _containers(doc)]  # fmt: skip
    assert containers and all(c["image"] == usage for c in containers)
    assert all(c.get("workingDir", workdir) == workdir for c in containers)
    copies = [a.split() for i, a in steps if i == "COPY" and "--from=" not in a]  # not a stage's
    sources = [w for a in copies for w in a[:-1] if not w.startswith("--")]
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies {src}, which does not exist"
    assert "jobs" in sources, "the manifests run jobs/*.py by path"
    install = next(a for i, a in steps if i == "RUN" and "pip install" in a)
    optional = (ROOT / "pyproject.toml").read_text().split("[project.optional-dependencies]")[1]
    for name in install_extras(install):
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
