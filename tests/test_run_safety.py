"""Runs and their surroundings, without Ray: names, the MLflow run of a training (a real SQLite
store), the local checkpoint copy, credentials and redaction, errors that cross processes."""

from __future__ import annotations

import base64
import http.server
import pickle
import threading
import time
from pathlib import Path

import pytest

from shan.config import Config, ConfigError, load_config, name_problem
from shan.data.format import DataError
from shan.errors import (
    BY_NAME,
    USER_ERRORS,
    CheckpointError,
    JobError,
    from_record,
    problems,
    run_job,
    to_record,
)
from shan.train import driver, tracking
from shan.tracking.runs import (
    HEARTBEAT_STALE,
    HEARTBEAT_TAG,
    RUN_TAG,
    config_differences,
    quote,
    redact,
)


# -- redaction and quoting -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "uri, shown",
    [
        ("https://alice:s3cret@mlflow.example.com/", "https://alice:***@mlflow.example.com/"),
        ("http://u:p%40ss@127.0.0.1:5000", "http://u:***@127.0.0.1:5000"),
        ("https://tok3n@host:443/x?y=1", "https://***@host:443/x?y=1"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
        ("databricks", "databricks"),
    ],
)
def test_redact(uri, shown):
    assert redact(uri) == shown
    assert "s3cret" not in redact(uri) and "p%40ss" not in redact(uri)


@pytest.mark.parametrize(
    "value", ["plain", "it's", 'say "hi"', "x' OR '1'='1", "back\\slash\\", "a%b_c", ""]
)
def test_quote_gives_mlflow_the_value_back(value):
    from mlflow.utils.search_utils import SearchUtils

    (parsed,) = SearchUtils.parse_search_filter(f"tags.`{RUN_TAG}` = {quote(value)}")
    assert parsed["value"] == value and parsed["key"] == RUN_TAG


def test_quote_refuses_what_mlflow_cannot_match():
    with pytest.raises(ValueError, match="both kinds of quote"):
        quote("""it's "both\"""")


# -- config differences ----------------------------------------------------------------------------
def test_config_differences_name_the_changed_keys():
    old = {k: str(v) for k, v in Config().flat().items()}
    new = load_config(None, ["optim.lr=1e-3", "model.d=64", "optim.epochs=40",
                             "tracking.run_name=other", "debug.nan_at_step=3",
                             "scaling.num_workers=4"]).flat()  # fmt: skip
    diff = config_differences(old, new)
    assert [k for k, _, _ in diff] == ["model.d", "optim.lr"]
    assert ("optim.lr", "0.0002", "0.001") in diff
    assert config_differences(old, Config().flat()) == []
    assert config_differences({}, new) == []  # keys the run never stored are new ones


# -- the MLflow run of a training ------------------------------------------------------------------
@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def params(*overrides: str) -> dict:
    return load_config(None, list(overrides)).flat()


def test_a_running_run_refuses_a_second_training(store):
    rid = tracking.start_run(store, "safety", "busy", params(), {}, settle=0)
    c = tracking.client(store)
    run = c.get_run(rid)
    assert run.info.status == "RUNNING" and run.data.params["optim.lr"] == "0.0002"
    assert tracking.is_alive(run)
    with pytest.raises(JobError, match=r"run 'busy' is running .*choose another --name"):
        tracking.start_run(store, "safety", "busy", params(), {}, settle=0)
    # the driver died long ago: its heartbeat is stale, the run may be continued
    c.set_tag(rid, HEARTBEAT_TAG, f"{time.time() - HEARTBEAT_STALE - 5:.0f}")
    assert tracking.start_run(store, "safety", "busy", params(), {}, settle=0) == rid
    assert len(tracking.runs_named(c, c.get_experiment_by_name("safety").experiment_id,
                                   "busy")) == 1  # fmt: skip


def test_continuing_with_another_config_names_the_keys(store):
    rid = tracking.start_run(store, "safety", "cfg-run", params(), {}, settle=0)
    tracking.end_run(store, rid, "FINISHED")
    with pytest.raises(JobError) as info:
        tracking.start_run(store, "safety", "cfg-run",
                           params("optim.lr=1e-3", "loss.margin=0.3"), {}, settle=0)  # fmt: skip
    line = str(info.value)
    assert "\n" not in line
    assert "loss.margin (0.2 there, 0.3 here)" in line
    assert "optim.lr (0.0002 there, 0.001 here)" in line
    assert "model.d" not in line
    c = tracking.client(store)
    assert c.get_run(rid).info.status == "FINISHED"  # refused before touching it
    more = params("optim.epochs=60", "scaling.num_workers=2", "debug.nan_at_step=1")
    assert tracking.start_run(store, "safety", "cfg-run", more, {}, settle=0) == rid


def test_two_trainings_claiming_one_run_at_once_leave_one(store):
    """Both pass the checks before either claims; reading the claim back sorts them out."""
    rid = tracking.start_run(store, "safety", "race", params(), {}, settle=0)
    tracking.end_run(store, rid, "KILLED")
    outcomes = []

    def go():
        try:
            outcomes.append(tracking.start_run(store, "safety", "race", params(), {}, settle=1.5))
        except JobError as e:
            outcomes.append(e)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(type(o).__name__ for o in outcomes) == ["JobError", "str"], outcomes


def test_heartbeat_keeps_the_run_alive(store):
    rid = tracking.start_run(store, "safety", "beating", params(), {}, settle=0)
    c = tracking.client(store)
    c.set_tag(rid, HEARTBEAT_TAG, "0")
    with tracking.Heartbeat(store, rid, every=0.2):
        deadline = time.time() + 20
        while tracking.heartbeat_age(c.get_run(rid)) > 60 and time.time() < deadline:
            time.sleep(0.2)
        assert tracking.is_alive(c.get_run(rid))


def test_fatal_box_reads_only_this_trainings_error(store):
    rid = tracking.start_run(store, "safety", "boxed", params(), {}, settle=0)
    tracking.FatalBox(store, rid, "old-token").write(to_record(DataError("old")))
    box = tracking.FatalBox(store, rid, "new-token")
    assert box.read() is None
    line = "non-finite loss (nan) at epoch 2, step 40"
    box.write(to_record(JobError(line)))
    assert box.read() == {"type": "JobError", "message": line}


def test_generated_names_are_new_and_valid(store, tmp_path):
    cfg = load_config(None, ["name=demo", f"tracking.storage_path={tmp_path}"])
    names = {driver.new_run_name(cfg) for _ in range(2000)}
    assert len(names) == 2000
    assert all(name_problem(n) is None and n.startswith("shan-demo-") for n in names)
    seen = []
    name = driver.new_run_name(cfg, lambda n: seen.append(n) or len(seen) < 3)
    assert name == seen[-1] and len(seen) == 3
    with pytest.raises(JobError, match="no unused run name"):
        driver.new_run_name(cfg, lambda n: True)
    # the storage folder of a name counts as taken, as does an MLflow run of it
    (tmp_path / "shan-x").mkdir()
    assert driver._taken(cfg, store, str(tmp_path), "shan-x")
    assert driver._taken(load_config(None, ["tracking.experiment=safety"]), store,
                         str(tmp_path), "busy")  # fmt: skip
    assert not driver._taken(cfg, store, str(tmp_path), "shan-y")


# -- the local checkpoint copy ---------------------------------------------------------------------
def fake_checkpoint(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True)
    for name in driver.CHECKPOINT_FILES:
        (folder / name).write_text(f"{tag} {name}")
    return folder


def test_local_copy_replaces_only_a_checkpoint_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = fake_checkpoint(tmp_path / "ray" / "ckpt", "v1")
    (src / ".metadata.json").write_text("{}")  # what else Ray keeps is not copied
    dest = Path(driver._keep_local_copy(str(src), "run-a", log=lambda s: None))
    assert dest == tmp_path / "checkpoints" / "run-a"
    assert sorted(p.name for p in dest.iterdir()) == sorted(driver.CHECKPOINT_FILES)
    src2 = fake_checkpoint(tmp_path / "ray" / "ckpt2", "v2")
    driver._keep_local_copy(str(src2), "run-a", log=lambda s: None)
    assert (dest / "model.pt").read_text() == "v2 model.pt"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["run-a"]  # no leftovers


@pytest.mark.parametrize("kind", ["extra-file", "subfolder", "symlink", "file", "link-inside"])
def test_a_foreign_folder_is_never_replaced(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    dest = tmp_path / "checkpoints" / "run-b"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    if kind == "symlink":
        dest.parent.mkdir()
        dest.symlink_to(outside)
    elif kind == "file":
        dest.parent.mkdir()
        dest.write_text("a file")
    else:
        fake_checkpoint(dest, "old")
        if kind == "extra-file":
            (dest / "notes.txt").write_text("mine")
        elif kind == "subfolder":
            (dest / "model.pt").unlink()
            (dest / "model.pt").mkdir()
        else:
            (dest / "vocab.json").unlink()
            (dest / "vocab.json").symlink_to(outside / "precious.txt")
    with pytest.raises(JobError, match="not a checkpoint folder of this project"):
        driver.check_checkpoint_dir(dest)
    src = fake_checkpoint(tmp_path / "ray" / "ckpt", "new")
    said = []
    kept = driver._keep_local_copy(str(src), "run-b", log=said.append)
    assert kept != str(dest) and "changed during training" in said[0]
    assert (outside / "precious.txt").read_text() == "keep"


# -- credentials -----------------------------------------------------------------------------------
class _Health(http.server.BaseHTTPRequestHandler):
    expected = ""

    def do_GET(self):  # noqa: N802
        ok = self.path == "/health" and self.headers.get("Authorization") == self.expected
        self.send_response(200 if ok else 401)
        self.end_headers()
        self.wfile.write(b"OK" if ok else b"no")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_check_reachable_sends_mlflows_credentials(health_server, monkeypatch):
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    _Health.expected = basic("alice", "s3cret")
    with pytest.raises(JobError, match="refused the credentials") as info:
        tracking.check_reachable(health_server)
    assert "MLFLOW_TRACKING_USERNAME" in str(info.value)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    tracking.check_reachable(health_server)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok")
    _Health.expected = "Bearer tok"
    tracking.check_reachable(health_server)
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(var)
    # credentials in the URI itself are used, and never shown
    _Health.expected = basic("bob", "pw@x")
    tracking.check_reachable(health_server.replace("//", "//bob:pw%40x@"))
    with pytest.raises(JobError) as info:
        tracking.check_reachable(health_server.replace("//", "//bob:wrong@"))
    assert "wrong" not in str(info.value) and "bob:***@" in str(info.value)


def test_an_unreachable_server_is_named_without_its_password():
    from shan_stack import free_port

    with pytest.raises(JobError, match="is unreachable") as info:
        tracking.check_reachable(f"http://bob:hunter2@127.0.0.1:{free_port()}", timeout=5)
    assert "hunter2" not in str(info.value)


# -- errors across processes -----------------------------------------------------------------------
@pytest.mark.parametrize("cls", USER_ERRORS, ids=lambda c: c.__name__)
def test_user_errors_cross_as_their_type(cls):
    e = cls("a must be 1, got 2") if cls is not ConfigError else cls("a bad", "b bad")
    back = from_record(to_record(e))
    assert type(back) is cls and problems(back) == problems(e)
    assert type(pickle.loads(pickle.dumps(back))) is cls


def test_an_unknown_type_becomes_a_job_error():
    back = from_record({"type": "KeyError", "message": "x"})
    assert type(back) is JobError and "KeyError: x" in str(back)
    assert set(BY_NAME) == {c.__name__ for c in USER_ERRORS}


def test_run_job_prints_one_line_per_problem(capsys):
    def main():
        raise ConfigError("optim.lr must be > 0 and finite, got -1.0", "seed must be >= 0")

    with pytest.raises(SystemExit) as info:
        run_job(main)
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: optim.lr must be > 0 and finite, got -1.0", "error: seed must be >= 0"]

    def two_lines():
        raise CheckpointError("bad checkpoint\ndetail")

    with pytest.raises(SystemExit):
        run_job(two_lines)
    assert capsys.readouterr().err.splitlines() == ["error: bad checkpoint", "  detail"]


def test_worker_errors_come_back_by_type():
    """Ray Train's WorkerGroupError holds each worker's own exception: a user error in it is
    raised as itself, anything else as one line naming the rank."""
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    def group(error):
        wrapped = UserExceptionWithTraceback(error, "Traceback ...\nlast line")
        return pickle.loads(pickle.dumps(WorkerGroupError("x", {1: wrapped})))

    class NoBox:
        def read(self):
            return None

    e = driver._as_user_error(group(DataError("shard 3 is damaged")), NoBox())
    assert type(e) is DataError and str(e) == "shard 3 is damaged"
    e = driver._as_user_error(group(RuntimeError("boom\nmore")), NoBox())
    assert type(e) is JobError and str(e) == "training failed: worker rank 1: RuntimeError: boom"
