"""What the MLflow UI shows of a run, against a SQLite store in a temporary folder: the
standard source tags (never replacing one already there), the experiment's kind, the data set
as the run's input, the description, and the system metrics of a node."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from shan.data.format import DatasetCard, SplitInfo
from shan.tracking import context, datasets, notes
from shan.tracking import runs as tracking
from shan.tracking.system import SystemMetrics

NOTE, SOURCE = "mlflow.note.content", "mlflow.source.name"


@pytest.fixture(scope="module")
def uri(tmp_path_factory) -> str:
    """One SQLite store for the module (creating one takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def new_run(uri: str, experiment: str = "ui-tests") -> str:
    c = tracking.client(uri)
    return c.create_run(tracking.experiment_id(c, experiment)).info.run_id


def card(digest: str = "cd" * 32) -> DatasetCard:
    splits = {"train": SplitInfo(30, 150, ["train/a"]), "dev": SplitInfo(8, 40, ["dev/a"])}
    return DatasetCard("synthetic", 6, 16, splits=splits, vocab_size=42, digest=digest)


# -- the experiment's kind -----------------------------------------------------------------------
def test_a_new_or_unmarked_experiment_opens_in_the_training_view_and_a_set_kind_stays(uri):
    c = tracking.client(uri)
    created = tracking.experiment_id(c, "kind-new")
    assert c.get_experiment(created).tags[tracking.KIND_TAG] == "custom_model_development"
    plain = c.create_experiment("kind-plain")
    assert tracking.experiment_id(c, "kind-plain") == plain
    assert c.get_experiment(plain).tags[tracking.KIND_TAG] == "custom_model_development"
    other = c.create_experiment("kind-genai", tags={tracking.KIND_TAG: "genai_development"})
    tracking.experiment_id(c, "kind-genai")
    assert c.get_experiment(other).tags[tracking.KIND_TAG] == "genai_development"


# -- source tags ---------------------------------------------------------------------------------
def test_source_tags_name_entry_point_kind_user_and_commit(monkeypatch):
    monkeypatch.setenv(context.GIT_COMMIT_ENV, "f" * 40)
    monkeypatch.setattr(sys, "argv", ["jobs/train.py", "--config", "x"])
    tags = context.source_tags("train", "default.py")
    assert tags == {
        SOURCE: "jobs/train.py",
        "mlflow.source.type": "LOCAL",
        "mlflow.user": context.user(),
        "mlflow.project.entryPoint": "train",
        "mlflow.source.git.commit": "f" * 40,
    }
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    assert context.source_tags("train", "x")["mlflow.source.type"] == "JOB"
    monkeypatch.setattr(sys, "argv", ["/somewhere/else/bin/shan", "evaluate", "m"])
    assert context.source_name("jobs/evaluate.py") == "shan evaluate"
    monkeypatch.setattr(sys, "argv", ["/elsewhere/pytest/__main__.py"])
    assert context.source_name("jobs/evaluate.py") == "jobs/evaluate.py"


def test_the_commit_is_the_checkout_s_else_none(monkeypatch, tmp_path):
    monkeypatch.delenv(context.GIT_COMMIT_ENV, raising=False)
    assert context.git_commit(str(tmp_path)) is None  # not a checkout
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert context.git_commit(str(tmp_path)) == head.strip()


def test_a_training_run_gets_the_tags_and_a_continued_one_only_those_it_lacks(uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    std = {SOURCE: "jobs/train.py", "mlflow.user": "alice"}
    rid = tracking.start_run(uri, "ui-train", "r1", {"a": 1}, std, settle=0)
    c = tracking.client(uri)
    assert {k: c.get_run(rid).data.tags[k] for k in std} == std
    c.set_tag(rid, "mlflow.user", "set-by-hand")
    c.delete_tag(rid, SOURCE)
    tracking.end_run(uri, rid, "FINISHED")
    again = {SOURCE: "shan train", "mlflow.user": "bob"}
    assert tracking.start_run(uri, "ui-train", "r1", {"a": 1}, again, settle=0) == rid
    tags = c.get_run(rid).data.tags
    assert (tags["mlflow.user"], tags[SOURCE]) == ("set-by-hand", "shan train")


# -- the data set --------------------------------------------------------------------------------
def test_the_data_set_is_the_run_s_input_once_with_its_sizes_and_context(uri):
    rid = new_run(uri)
    c = tracking.client(uri)
    for _ in range(2):
        datasets.log_dataset(c, rid, card(), "s3://bucket/f30k", "training")
    [given] = c.get_run(rid).inputs.dataset_inputs
    d = given.dataset
    assert (d.name, d.digest, d.source_type) == ("synthetic", "cd" * 16, "s3")
    assert json.loads(d.source) == {"uri": "s3://bucket/f30k"}
    profile = json.loads(d.profile)
    assert profile["splits"] == {
        "train": {"images": 30, "captions": 150},
        "dev": {"images": 8, "captions": 40},
    }
    assert [(t.key, t.value) for t in given.tags] == [("mlflow.data.context", "training")]


def test_a_card_without_a_digest_gets_one_of_its_own_and_a_local_path_is_local():
    a, b = card(digest=""), card(digest="")
    b.splits["dev"].images = 9
    assert datasets.digest(a) != datasets.digest(b) and len(datasets.digest(a)) == 32
    assert datasets.dataset(a, "data/f30k").source_type == "local"


# -- the description -----------------------------------------------------------------------------
def test_the_best_epoch_table_is_the_description_unless_someone_wrote_one(uri):
    rid = new_run(uri)
    c = tracking.client(uri)
    notes.describe_training(c, rid, "r1", {"epoch": 3, "val/rsum": 1.0}, "| total | 12.5 |")
    note = c.get_run(rid).data.tags[NOTE]
    assert "best epoch (3)" in note and "| total | 12.5 |" in note
    # the checkpoint is the run's logged model now, not an artifact ``checkpoint/``
    assert "`checkpoint/`" not in note and "logged model" in note
    notes.describe_training(c, rid, "r1", {"epoch": 4}, "| total | 20.0 |")  # ours: replaced
    assert "| total | 20.0 |" in c.get_run(rid).data.tags[NOTE]
    c.set_tag(rid, NOTE, "my own words")
    assert not notes.set_note(c, rid, "new table")
    assert c.get_run(rid).data.tags[NOTE] == "my own words"


# -- system metrics ------------------------------------------------------------------------------
def test_system_metrics_are_sampled_per_node_and_a_short_block_logs_one_sample(uri):
    c = tracking.client(uri)
    rid = new_run(uri)
    with SystemMetrics(uri, rid, every=0.2, node_id="10.0.0.7"):
        time.sleep(1.0)
    keys = set(c.get_run(rid).data.metrics)
    cpu = "system/10.0.0.7/cpu_utilization_percentage"
    assert cpu in keys and all(k.startswith("system/10.0.0.7/") for k in keys)
    assert len(c.get_metric_history(rid, cpu)) >= 2
    short = new_run(uri)
    with SystemMetrics(uri, short, every=60, node_id="n2"):
        pass  # shorter than one interval: one sample when it ends
    hist = c.get_metric_history(short, "system/n2/system_memory_usage_megabytes")
    assert len(hist) == 1
    off = new_run(uri)
    with SystemMetrics(uri, off, every=0, node_id="n3"):
        time.sleep(0.3)
    assert not c.get_run(off).data.metrics


def test_the_shan_command_is_named_after_its_dispatcher_renamed_argv(monkeypatch):
    # shan_cli.main sets sys.argv[0] to "shan <command>" (argparse's prog) before the command
    # runs: the command's runs must still be named "shan train", not the jobs/ shim
    import shan_cli.main
    import shan_cli.train

    seen = []
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/shan", "train", "--config", "x"])
    monkeypatch.setattr(
        shan_cli.train, "main", lambda argv: seen.append(context.source_name("jobs/train.py"))
    )
    shan_cli.main.main(["train", "--config", "x"])
    assert seen == ["shan train"]


def test_two_jobs_creating_the_experiment_at_once_get_the_same_one(uri):
    c = tracking.client(uri)
    first = tracking.experiment_id(c, "raced")  # the other job, a moment earlier

    class Late:  # this job looked before the other one created it
        looked = False

        def __getattr__(self, name):
            return getattr(c, name)

        def get_experiment_by_name(self, name):
            if not self.looked:
                self.looked = True
                return None
            return c.get_experiment_by_name(name)

    assert tracking.experiment_id(Late(), "raced") == first
