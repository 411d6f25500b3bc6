"""Promotion against a fake MLflow registry and a fake evaluation: who gets the alias, who is
evaluated, and what is recorded."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
from mlflow.exceptions import MlflowException

from shan.errors import JobError
from shan.promotion import eval_tag, promote

NAME, ALIAS = "shan-demo", "champion"
WHERE = ("test", "plain")
TAG = eval_tag(*WHERE)


@dataclass
class Version:
    name: str
    version: str
    tags: dict = field(default_factory=dict)
    run_id: str = "train-run"
    source: str = "runs:/train-run/checkpoint"


class FakeRegistry:
    """The MlflowClient calls promotion makes; versions are handed out as snapshots, as a real
    client's are (a tag set later is not seen by an object fetched before)."""

    def __init__(self, versions: dict[str, dict] | None = None, aliases: dict | None = None):
        self.versions = {v: Version(NAME, v, dict(tags)) for v, tags in (versions or {}).items()}
        self.aliases = dict(aliases or {})
        self.run_tags: dict[str, dict] = {}
        self.dicts: dict[str, dict] = {}
        self.calls: list[str] = []

    def _check(self, name: str) -> None:
        if name != NAME:
            raise MlflowException(f"registered model {name!r} not found")

    def get_model_version_by_alias(self, name, alias):
        self._check(name)
        if alias not in self.aliases:
            raise MlflowException(f"alias {alias} not found")
        return copy.deepcopy(self.versions[self.aliases[alias]])

    def get_model_version(self, name, version):
        self._check(name)
        if str(version) not in self.versions:
            raise MlflowException(f"version {version} not found")
        return copy.deepcopy(self.versions[str(version)])

    def set_model_version_tag(self, name, version, key, value):
        self.calls.append(f"tag {version} {key}={value}")
        self.versions[str(version)].tags[key] = value

    def set_registered_model_alias(self, name, alias, version):
        self.calls.append(f"alias {alias}->{version}")
        self.aliases[alias] = str(version)

    def set_tag(self, run_id, key, value):
        self.run_tags.setdefault(run_id, {})[key] = value

    def log_dict(self, run_id, dictionary, artifact_file):
        self.dicts[f"{run_id}/{artifact_file}"] = copy.deepcopy(dictionary)


class FakeEvaluate:
    """rsum per version; counts the references it is asked to evaluate."""

    def __init__(self, rsums: dict[str, float], run_id: str | None = "eval-run"):
        self.rsums, self.run_id, self.refs = rsums, run_id, []

    def __call__(self, ref: str) -> tuple[float, str | None]:
        self.refs.append(ref)
        return self.rsums[ref.rsplit("/", 1)[1]], self.run_id


def run(c: FakeRegistry, ev: FakeEvaluate, candidate: str = f"models:/{NAME}/2") -> dict:
    lines: list[str] = []
    out = promote(candidate=candidate, alias=ALIAS, evaluate=ev, where=WHERE, log=lines.append, c=c)
    assert lines, "promotion says what it decided"
    return out


def test_eval_tag_names_split_and_protocol():
    assert eval_tag("test", "coco-1k") == "shan.eval.test.coco-1k.rsum"


def test_no_champion_the_candidate_is_promoted():
    c, ev = FakeRegistry({"2": {}}), FakeEvaluate({"2": 300.0})
    d = run(c, ev)
    assert d["decision"] == "promoted" and c.aliases == {ALIAS: "2"}
    assert ev.refs == [f"models:/{NAME}/2"]
    assert c.versions["2"].tags[TAG] == "300.0000"
    assert d["previous_version"] is None and d["previous_rsum"] is None


def test_the_decision_record():
    c, ev = FakeRegistry({"1": {TAG: "250.5"}, "2": {}}, {ALIAS: "1"}), FakeEvaluate({"2": 300.0})
    d = run(c, ev)
    assert d == {
        "decision": "promoted",
        "model": NAME,
        "candidate_version": "2",
        "candidate_rsum": 300.0,
        "alias": ALIAS,
        "previous_version": "1",
        "previous_rsum": 250.5,
        "split": "test",
        "protocol": "plain",
    }
    # the evaluation run carries the decision, as a tag and as promotion.json
    assert c.run_tags == {"eval-run": {"shan.promotion": "promoted"}}
    assert c.dicts == {"eval-run/promotion.json": d}


@pytest.mark.parametrize(
    ("rsum", "decision", "holder"),
    [(300.1, "promoted", "2"), (299.9, "kept", "1"), (300.0, "kept", "1")],  # a tie keeps
)
def test_candidate_against_a_tagged_champion(rsum, decision, holder):
    c = FakeRegistry({"1": {TAG: "300.0000"}, "2": {}}, {ALIAS: "1"})
    ev = FakeEvaluate({"2": rsum})
    d = run(c, ev)
    assert d["decision"] == decision and c.aliases[ALIAS] == holder
    assert ev.refs == [f"models:/{NAME}/2"]  # the champion's tag is used, not re-evaluated
    assert (d["previous_version"], d["previous_rsum"]) == ("1", 300.0)
    assert c.versions["2"].tags[TAG] == f"{rsum:.4f}"  # the loser is tagged too
    assert c.run_tags["eval-run"]["shan.promotion"] == decision


def test_kept_never_moves_the_alias():
    c = FakeRegistry({"1": {TAG: "300"}, "2": {}}, {ALIAS: "1"})
    run(c, FakeEvaluate({"2": 10.0}))
    assert not any(call.startswith("alias") for call in c.calls)


def test_the_candidate_already_holds_the_alias():
    c, ev = FakeRegistry({"2": {}}, {ALIAS: "2"}), FakeEvaluate({"2": 300.0})
    d = run(c, ev)
    assert d == {"decision": "unchanged", "version": "2", "alias": ALIAS}
    assert ev.refs == [] and c.calls == [] and c.run_tags == {}


def test_a_candidate_named_by_alias():
    c = FakeRegistry({"1": {TAG: "300"}, "3": {}}, {ALIAS: "1", "candidate": "3"})
    ev = FakeEvaluate({"3": 301.0})
    d = run(c, ev, candidate=f"models:/{NAME}@candidate")
    assert d["decision"] == "promoted" and c.aliases[ALIAS] == "3"
    assert ev.refs == [f"models:/{NAME}/3"]  # evaluated by version, not by the moving alias


def test_the_champion_by_alias_is_unchanged_when_named_by_its_alias():
    c, ev = FakeRegistry({"1": {}}, {ALIAS: "1"}), FakeEvaluate({"1": 300.0})
    assert run(c, ev, candidate=f"models:/{NAME}@{ALIAS}")["decision"] == "unchanged"
    assert ev.refs == []


def test_a_candidate_evaluated_before_on_this_split_is_skipped():
    c = FakeRegistry({"1": {TAG: "300"}, "2": {TAG: "999.0"}}, {ALIAS: "1"})
    ev = FakeEvaluate({"2": 999.0})
    d = run(c, ev)
    assert d == {"decision": "skipped", "version": "2"}
    assert ev.refs == [] and c.aliases[ALIAS] == "1" and c.calls == []


def test_a_tag_of_another_split_or_protocol_does_not_skip():
    other = {eval_tag("dev", "plain"): "1.0", eval_tag("test", "f30k"): "2.0"}
    c = FakeRegistry({"2": other}, {})
    ev = FakeEvaluate({"2": 300.0})
    assert run(c, ev)["decision"] == "promoted" and ev.refs == [f"models:/{NAME}/2"]


def test_an_untagged_champion_is_evaluated_once_and_tagged():
    c = FakeRegistry({"1": {}, "2": {}}, {ALIAS: "1"})
    ev = FakeEvaluate({"1": 305.0, "2": 300.0})
    d = run(c, ev)
    assert ev.refs == [f"models:/{NAME}/2", f"models:/{NAME}/1"]
    assert d["decision"] == "kept" and d["previous_rsum"] == 305.0
    assert c.versions["1"].tags[TAG] == "305.0000"
    # the next candidate compares with the tag: the champion is not evaluated again
    c.versions["3"] = Version(NAME, "3")
    ev2 = FakeEvaluate({"3": 306.0})
    assert run(c, ev2, candidate=f"models:/{NAME}/3")["decision"] == "promoted"
    assert ev2.refs == [f"models:/{NAME}/3"]


def test_an_evaluation_without_a_run_records_nothing_on_runs():
    c, ev = FakeRegistry({"2": {}}), FakeEvaluate({"2": 300.0}, run_id=None)
    assert run(c, ev)["decision"] == "promoted"
    assert c.run_tags == {} and c.dicts == {}


def test_a_promotion_that_failed_midway_is_retried_later():
    c = FakeRegistry({"1": {}, "2": {}}, {ALIAS: "1"})

    def champion_fails(ref: str):
        if ref.endswith("/1"):
            raise JobError("the evaluation actors failed to start")
        return 310.0, "eval-run"

    with pytest.raises(JobError):
        run(c, champion_fails)
    ev = FakeEvaluate({"1": 300.0, "2": 310.0})
    assert run(c, ev)["decision"] == "promoted"


@pytest.mark.parametrize(
    "candidate", ["checkpoints/run-1", "0123456789abcdef0123456789abcdef", "s3://b/model"]
)
def test_a_candidate_that_is_not_registered_is_a_job_error(candidate):
    c, ev = FakeRegistry({"2": {}}), FakeEvaluate({"2": 300.0})
    with pytest.raises(JobError, match="needs a registered model"):
        run(c, ev, candidate=candidate)
    assert ev.refs == []


@pytest.mark.parametrize("candidate", [f"models:/{NAME}/7", f"models:/{NAME}@nobody"])
def test_a_candidate_missing_from_the_registry_is_a_job_error(candidate):
    c, ev = FakeRegistry({"2": {}}), FakeEvaluate({"2": 300.0})
    with pytest.raises(JobError, match="not found in the registry") as e:
        run(c, ev, candidate=candidate)
    assert candidate in str(e.value) and ev.refs == []
