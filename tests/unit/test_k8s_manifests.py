"""cluster/k8s/ against Kubernetes' own schemas and KubeRay's fields.

Every document of a core kind (CronJob, Deployment, Service, NetworkPolicy, the Secrets'
template) is validated by kubernetes-validate against the OpenAPI schemas of two Kubernetes
versions, strictly: an unknown field or a value of the wrong type fails. KubeRay's kinds
(RayCluster, RayJob) have no bundled schema: their pod templates are validated as core
PodTemplates, and the fields the project relies on are checked here (the head takes no work, GPU
workers scale from zero, the jobs ask for GPUs with flags their real parsers accept).
"""

from __future__ import annotations

import argparse
import copy
import re
import shlex
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from shan.config import load_config
from shan_cli import evaluate as evaluate_cli
from shan_cli import train as train_cli
from tests.helpers import ROOT, known_flags

K8S = ROOT / "cluster" / "k8s"
# the manifests, and the Secrets' template (not *.yaml: `kubectl apply -f cluster/k8s/` skips it)
SECRETS_TEMPLATE = K8S / "secrets.yaml.example"
MANIFESTS = [*sorted(K8S.glob("*.yaml")), SECRETS_TEMPLATE]
# the oldest Kubernetes checked, and the newest whose schemas the pinned validator bundles
KUBERNETES = ("1.30", "1.37")
KUBERAY = "ray.io/v1"
# Kubernetes' quantity grammar (resource.Quantity): 4, 500m, 16Gi, 1e3
QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?")
RESOURCE_NAMES = {"cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"}
GPU = "nvidia.com/gpu"
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")

# ray.io/v1 fields known to this check, by object: a key outside them is a typo. KubeRay's API
# has these and more; add one here when a manifest starts to use it.
KUBERAY_FIELDS = {
    "RayClusterSpec": {
        "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling",
        "autoscalerOptions", "headServiceAnnotations", "suspend", "managedBy",
        "gcsFaultToleranceOptions", "upgradeStrategy", "authOptions",
    },
    "HeadGroupSpec": {
        "template", "rayStartParams", "serviceType", "headService", "enableIngress",
        "resources", "labels",
    },
    "WorkerGroupSpec": {
        "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams",
        "template", "scaleStrategy", "suspend", "idleTimeoutSeconds", "resources", "labels",
    },
    "RayJobSpec": {
        "entrypoint", "runtimeEnvYAML", "rayClusterSpec", "clusterSelector",
        "submitterPodTemplate", "submitterConfig", "submissionMode", "activeDeadlineSeconds",
        "backoffLimit", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished", "suspend", "jobId",
        "metadata", "managedBy", "deletionStrategy", "entrypointNumCpus", "entrypointNumGpus",
        "entrypointResources",
    },
}  # fmt: skip
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode"}
# Secret keys whose values are no secret: the template may hold real values for them
NOT_SECRET = {"username", "admin_username", "AWS_DEFAULT_REGION", "MLFLOW_TRACKING_URI"}
PLACEHOLDER = "REPLACE-ME"


# -- loading ---------------------------------------------------------------------------------------
def documents(path: Path) -> list[dict]:
    """The YAML documents of ``path`` (empty ones dropped)."""
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_documents() -> list[tuple[str, dict]]:
    """(file name, document) of every manifest."""
    return [(path.name, doc) for path in MANIFESTS for doc in documents(path)]


def one(kind: str) -> dict:
    """The first document of ``kind`` in the manifests; the only one, but for Secrets."""
    found = [d for _, d in all_documents() if d["kind"] == kind]
    assert len(found) == 1 or kind == "Secret", f"{len(found)} {kind} documents"
    return found[0]


def is_kuberay(doc: dict) -> bool:
    return doc["apiVersion"] == KUBERAY


def ray_cluster_specs(doc: dict) -> list[tuple[str, dict]]:
    """(path, RayClusterSpec) of a KubeRay document: a RayCluster's spec, a RayJob's
    rayClusterSpec (none where the RayJob runs on an existing cluster)."""
    if doc["kind"] == "RayCluster":
        return [("spec", doc["spec"])]
    spec = doc["spec"].get("rayClusterSpec")
    return [("spec.rayClusterSpec", spec)] if spec else []


def kuberay_pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """(path, pod template) of a KubeRay document: the head's and each worker group's of its
    cluster spec, and a RayJob's submitter's."""
    found = []
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        found.append(("spec.submitterPodTemplate", doc["spec"]["submitterPodTemplate"]))
    for where, spec in ray_cluster_specs(doc):
        found.append((f"{where}.headGroupSpec.template", spec["headGroupSpec"]["template"]))
        for i, group in enumerate(spec.get("workerGroupSpecs", [])):
            found.append((f"{where}.workerGroupSpecs[{i}].template", group["template"]))
    return found


def core_objects(doc: dict) -> list[tuple[str, dict]]:
    """(what, object) to validate against the core schemas: a core document itself; each pod
    template of a KubeRay document, as a PodTemplate (metadata and spec checked as Kubernetes
    checks a pod's)."""
    name = doc["metadata"]["name"]
    if not is_kuberay(doc):
        return [(f"{doc['kind']}/{name}", doc)]
    return [
        (f"{doc['kind']}/{name} {where}", pod_template(f"{name}-{i}", template))
        for i, (where, template) in enumerate(kuberay_pod_templates(doc))
    ]


def pod_template(name: str, template: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": name},
        "template": template,
    }


def validate(obj: dict, version: str, strict: bool = True) -> None:
    """kubernetes-validate, strict by default (unknown fields fail)."""
    kubernetes_validate.validate(obj, version, strict=strict)


def containers(node: Any) -> list[dict]:
    """Every container (of a ``containers`` or ``initContainers`` list) anywhere in ``node``."""
    found = []
    if isinstance(node, dict):
        for key, v in node.items():
            if key in ("containers", "initContainers") and isinstance(v, list):
                found += [c for c in v if isinstance(c, dict)]
            found += containers(v)
    elif isinstance(node, list):
        for v in node:
            found += containers(v)
    return found


CORE = [
    pytest.param(obj, id=f"{name}:{what}")
    for name, doc in all_documents()
    for what, obj in core_objects(doc)
]


# -- core schemas ----------------------------------------------------------------------------------
def test_the_manifests_hold_the_core_kinds_and_kuberays():
    kinds = {d["kind"] for _, d in all_documents()}
    assert kinds >= {"CronJob", "Deployment", "Service", "Secret", "NetworkPolicy"}, kinds
    assert {d["kind"] for _, d in all_documents() if is_kuberay(d)} == {"RayCluster", "RayJob"}


@pytest.mark.parametrize("version", KUBERNETES)
@pytest.mark.parametrize("obj", CORE)
def test_core_objects_validate_strictly(obj, version):
    validate(obj, version)


def test_every_kuberay_pod_template_is_validated():
    """Head, GPU workers and the training submitter: three pod templates, each one checked."""
    templates = [w for _, d in all_documents() if is_kuberay(d) for w, _ in core_objects(d)]
    assert len(templates) == 3, templates


@pytest.mark.parametrize(
    "name,doc",
    [pytest.param(n, d, id=f"{n}:{d['kind']}/{d['metadata']['name']}") for n, d in all_documents()],
)
def test_resource_quantities_are_kubernetes_quantities(name, doc):
    """The schemas take any string for a quantity: "16 GB" or `nvidia.com/gpus` would pass."""
    for c in containers(doc):
        for section, values in c.get("resources", {}).items():
            assert section in ("limits", "requests"), f"{name}/{c['name']}: {section}"
            for resource, value in values.items():
                assert resource in RESOURCE_NAMES, f"{name}/{c['name']}: {resource}"
                assert QUANTITY.fullmatch(str(value)), f"{name}/{c['name']}: {resource}={value!r}"


def plant(doc: dict, path: tuple, value: Any) -> dict:
    """A copy of ``doc`` with ``value`` at ``path`` (keys and list indexes)."""
    doc = copy.deepcopy(doc)
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


CONTAINER = ("spec", "template", "spec", "containers", 0)
JOB_POD = ("spec", "jobTemplate", "spec", "template", "spec")
WORKER = ("spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0)


def bad(kind: str, path: tuple, value: Any, typo: bool) -> Any:
    """A case of :func:`test_the_validation_is_strict`, named by what it plants where."""
    what = f"typo {path[-1]}" if typo else f"{type(value).__name__} at {path[-1]}"
    return pytest.param(kind, path, value, typo, id=f"{kind}: {what}")


@pytest.mark.parametrize(
    "kind,path,value,typo",
    [
        bad("Deployment", (*CONTAINER, "imagee"), "ghcr.io/your-org/shan:latest", True),
        bad("Deployment", ("spec", "replicas"), "1", False),
        bad("CronJob", (*JOB_POD, "restartpolicy"), "Never", True),
        bad("CronJob", ("spec", "startingDeadlineSeconds"), "3600", False),
        bad("Service", ("spec", "ports", 0, "targetport"), 5000, True),
        bad("Service", ("spec", "ports", 0, "port"), "5000", False),
        bad("NetworkPolicy", ("spec", "ingress", 0, "form"), [], True),
        bad("NetworkPolicy", ("spec", "policyTypes"), "Ingress", False),
        bad("Secret", ("stringdata",), {"token": "x"}, True),
        bad("Secret", ("stringData", "token"), 5, False),
        bad("RayCluster", (*WORKER, "imagee"), "ghcr.io/your-org/shan:latest", True),
        bad("RayCluster", (*WORKER, "ports"), {"containerPort": 8265}, False),
        bad("RayJob", ("spec", "submitterPodTemplate", "spec", "restartPolicyy"), "Never", True),
    ],
)
def test_the_validation_is_strict(kind, path, value, typo):
    """A typo'd field or a value of the wrong type, planted in a valid document (in a pod
    template for KubeRay's kinds), is rejected; a typo passes a non-strict validation."""
    planted = plant(one(kind), path, value)
    for version in KUBERNETES:
        with pytest.raises(kubernetes_validate.ValidationError):
            for _, obj in core_objects(planted):
                validate(obj, version)
    if typo:  # strict mode is what catches it
        for _, obj in core_objects(planted):
            validate(obj, KUBERNETES[-1], strict=False)


# -- KubeRay ---------------------------------------------------------------------------------------
def ray_pin() -> str:
    return re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)


def known_fields(what: str, obj: dict, where: str) -> None:
    unknown = set(obj) - KUBERAY_FIELDS[what]
    assert not unknown, f"{where}: not a {what} field: {sorted(unknown)}"


def gpus(container: dict) -> int:
    """The GPUs a container asks for (its limit: Kubernetes and KubeRay read limits)."""
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


def check_cluster_spec(spec: dict, where: str) -> None:
    """A RayClusterSpec as the project relies on it: the pinned Ray, the in-tree autoscaler, a
    head that takes no work and has no GPU, GPU worker groups that scale from zero."""
    known_fields("RayClusterSpec", spec, where)
    assert spec["rayVersion"] == ray_pin(), f"{where}: rayVersion is not constraints.txt's Ray"
    assert spec["enableInTreeAutoscaling"] is True, f"{where}: no autoscaler"
    head = spec["headGroupSpec"]
    known_fields("HeadGroupSpec", head, f"{where}.headGroupSpec")
    assert head["rayStartParams"].get("num-cpus") == "0", f"{where}: the head takes work"
    head_pod = head["template"]["spec"]
    assert not any(gpus(c) for c in head_pod["containers"]), f"{where}: a GPU on the head"
    groups = spec["workerGroupSpecs"]
    assert groups, f"{where}: no worker group"
    for i, group in enumerate(groups):
        check_worker_group(group, f"{where}.workerGroupSpecs[{i}]")
    for params in [head["rayStartParams"], *(g["rayStartParams"] for g in groups)]:
        not_text = {k: v for k, v in params.items() if not isinstance(v, str)}
        assert not not_text, f"{where}: rayStartParams are a map of strings: {not_text}"
    pods = [head_pod, *(g["template"]["spec"] for g in groups)]
    for c in [c for pod in pods for c in pod["containers"]]:
        assert c.get("image"), f"{where}/{c['name']}: no image"


def check_worker_group(group: dict, where: str) -> None:
    """A GPU worker group that scales from zero, to a bounded size."""
    known_fields("WorkerGroupSpec", group, where)
    assert group["minReplicas"] == 0, f"{where}: does not scale from zero"
    assert isinstance(group["maxReplicas"], int) and group["maxReplicas"] >= 1, where
    assert 0 <= group.get("replicas", 0) <= group["maxReplicas"], where
    ray_container = group["template"]["spec"]["containers"][0]  # KubeRay's Ray container
    assert gpus(ray_container) >= 1, f"{where}: the workers ask for no {GPU} limit"


def gpu_capacity(cluster: dict) -> int:
    """The GPUs of the RayCluster's worker groups at their largest."""
    return sum(
        g["maxReplicas"] * gpus(g["template"]["spec"]["containers"][0])
        for g in cluster["spec"]["workerGroupSpecs"]
    )


def test_raycluster_has_the_fields_the_project_relies_on():
    cluster = one("RayCluster")
    assert DNS_1035.fullmatch(cluster["metadata"]["name"]), "KubeRay wants a DNS-1035 name"
    assert set(cluster) == {"apiVersion", "kind", "metadata", "spec"}
    for where, spec in ray_cluster_specs(cluster):
        check_cluster_spec(spec, where)


def test_check_of_the_raycluster_can_fail():
    """The RayCluster check catches a head that takes work, a worker group that does not scale
    from zero, one without GPUs, a typo'd field, and a number where KubeRay wants a string."""
    spec = one("RayCluster")["spec"]
    broken = [
        plant(spec, ("headGroupSpec", "rayStartParams", "num-cpus"), "4"),
        plant(spec, ("workerGroupSpecs", 0, "minReplicas"), 1),
        plant(spec, ("workerGroupSpecs", 0, "template", "spec", "containers", 0, "resources"), {}),
        plant(spec, ("enableInTreeAutoScaling",), True),
        plant(spec, ("workerGroupSpecs", 0, "rayStartParams"), {"num-gpus": 1}),  # not "1"
    ]
    for broken_spec in broken:
        with pytest.raises(AssertionError):
            check_cluster_spec(broken_spec, "spec")


def parse(parser: argparse.ArgumentParser, argv: list[str], intermixed: bool) -> argparse.Namespace:
    """``argv`` parsed by a job's real parser (as its ``main`` parses it); a rejection fails the
    test with argparse's message (printed to stderr)."""
    argv = known_flags(parser, argv)
    try:
        return parser.parse_intermixed_args(argv) if intermixed else parser.parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"the job's parser rejects {argv} (exit {e.code})")


def wait_timeout(argv: list[str], deadline: int, where: str) -> None:
    """The command waits for the autoscaler a bounded time, shorter than its job's deadline."""
    assert "--wait-timeout" in argv, f"{where}: no --wait-timeout"
    seconds = int(argv[argv.index("--wait-timeout") + 1])
    assert 0 < seconds < deadline, f"{where}: --wait-timeout {seconds} vs deadline {deadline}"


def train_args(entrypoint: str) -> list[str]:
    """The arguments of ``python jobs/train.py ...`` or ``shan train ...``."""
    words = shlex.split(entrypoint)
    assert words[:2] in (["python", "jobs/train.py"], ["shan", "train"]), words[:2]
    assert words[:2] == ["shan", "train"] or (ROOT / words[1]).is_file()
    return words[2:]


def test_rayjob_trains_on_the_raycluster_with_gpus():
    """The RayJob submits to the RayCluster (by KubeRay's label), from a submitter pod that never
    restarts, a training command the real parser of ``shan train`` accepts, with GPUs asked for
    and fitting the worker groups, and a bounded wait for them."""
    job, cluster = one("RayJob"), one("RayCluster")
    spec = job["spec"]
    known_fields("RayJobSpec", spec, "RayJob spec")
    assert DNS_1035.fullmatch(job["metadata"]["name"]), "KubeRay wants a DNS-1035 name"
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), "a cluster: one way"
    if "clusterSelector" in spec:  # an existing cluster: the RayJob must not own its lifetime
        assert spec["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
        assert not spec.get("shutdownAfterJobFinishes") and not spec.get("suspend")
    for where, cluster_spec in ray_cluster_specs(job):
        check_cluster_spec(cluster_spec, f"RayJob {where}")
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    assert spec["activeDeadlineSeconds"] > 0 and spec.get("backoffLimit", 0) >= 0
    assert spec["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert runtime_env["working_dir"] == head["workingDir"], "the project where the image has it"

    argv = train_args(spec["entrypoint"])
    wait_timeout(argv, spec["activeDeadlineSeconds"], "RayJob entrypoint")
    args = parse(train_cli.parser(), argv, intermixed=True)
    load_config(args.config, [o for o in args.overrides if "=" in o])  # config, overrides valid
    assert args.gpus_per_worker and args.workers, "training asks for GPUs: workers x GPUs"
    assert args.workers * args.gpus_per_worker <= gpu_capacity(cluster)


def submit_command(cron: dict) -> list[str]:
    """The words of the CronJob's one command: ``bash -c "ray job submit ... -- python ..."``."""
    (c,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["bash", "-c"] and len(c["args"]) == 1, c["command"]
    return shlex.split(c["args"][0])


def test_eval_cronjob_submits_to_the_raycluster_with_gpus():
    """The scheduled evaluation: `ray job submit` (Ray's own CLI parses its options) to the
    RayCluster's head Service, and `jobs/evaluate.py` with flags its real parser accepts, GPU
    actors that fit the worker groups, a bounded wait for them, and promotion."""
    from ray.dashboard.modules.job.cli import submit

    cron, cluster = one("CronJob"), one("RayCluster")
    words = submit_command(cron)
    assert words[:3] == ["ray", "job", "submit"], words[:3]
    params = submit.make_context("submit", words[3:]).params
    host, port = re.fullmatch(r"http://([\w.-]+):(\d+)", params["address"]).groups()
    assert host == f"{cluster['metadata']['name']}-head-svc", "KubeRay's head Service name"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": int(port), "name": "dashboard"} in head["ports"]

    entrypoint = list(params["entrypoint"])
    assert entrypoint[:2] == ["python", "jobs/evaluate.py"] and (ROOT / entrypoint[1]).is_file()
    argv = entrypoint[2:]
    wait_timeout(argv, cron["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"], "CronJob")
    args = parse(evaluate_cli.parser(), argv, intermixed=False)
    assert args.promote, "the scheduled evaluation promotes"
    assert args.gpus_per_actor and args.actors, "evaluation asks for GPUs: actors x GPUs"
    assert args.actors * args.gpus_per_actor <= gpu_capacity(cluster)


def test_a_flag_the_parser_lacks_fails_the_parse():
    with pytest.raises(pytest.fail.Exception):
        parse(train_cli.parser(), ["--gpus-per-workr", "1"], intermixed=True)
    with pytest.raises(pytest.fail.Exception):
        parse(evaluate_cli.parser(), ["--model", "m", "--data", "d", "--actorz", "2"], False)


# -- the Secrets' template -------------------------------------------------------------------------
def secret_references() -> dict[str, set[str]]:
    """Secret name -> keys the manifests read (secretKeyRef); envFrom Secrets with no keys."""
    refs: dict[str, set[str]] = {}
    for _, doc in all_documents():
        for c in containers(doc):
            for e in c.get("env", []):
                if ref := e.get("valueFrom", {}).get("secretKeyRef"):
                    refs.setdefault(ref["name"], set()).add(ref["key"])
            for source in c.get("envFrom", []):
                refs.setdefault(source["secretRef"]["name"], set())
    return refs


def test_the_secrets_template_has_every_secret_and_placeholders_only():
    """Every Secret and key the manifests read, values in stringData (readable), and every
    secret value a placeholder."""
    assert SECRETS_TEMPLATE.read_text().startswith("#"), "it says how to use it"
    secrets = {d["metadata"]["name"]: d for d in documents(SECRETS_TEMPLATE)}
    assert all(d["kind"] == "Secret" and "data" not in d for d in secrets.values())
    refs = secret_references()
    assert set(secrets) == set(refs), (sorted(secrets), sorted(refs))
    for name, keys in refs.items():
        values = secrets[name]["stringData"]
        assert keys <= set(values), f"{name}: {sorted(keys - set(values))} missing"
        for key, value in values.items():
            assert key in NOT_SECRET or value == PLACEHOLDER, f"{name}.{key}: not a placeholder"
