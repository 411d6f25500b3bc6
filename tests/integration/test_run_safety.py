"""The MLflow run of a training against a real MLflow store (SQLite, no server): a running run
refuses a second training, a continued run may not change the config, two trainings claiming
one run leave one, the heartbeat, the fatal box, and generated run names that are free."""

from __future__ import annotations

import threading
import time

import pytest

from shan.config import load_config
from shan.data.format import DataError
from shan.errors import JobError, to_record
from shan.tracking import runs as tracking
from shan.tracking.runs import HEARTBEAT_STALE, HEARTBEAT_TAG
from shan.train import driver


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
    more = params("optim.epochs=60", "scaling.num_workers=2", "tracking.log_every=5")
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


def test_a_name_in_use_is_taken(store, tmp_path, monkeypatch):
    """Generated names skip one in use (``shan.train.driver._taken``): a storage folder of
    that name, an MLflow run of it, or a local checkpoint copy."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["name=demo", f"tracking.storage_path={tmp_path}"])
    (tmp_path / "shan-x").mkdir()
    assert driver._taken(cfg, store, str(tmp_path), "shan-x")
    assert driver._taken(load_config(None, ["tracking.experiment=safety"]), store,
                         str(tmp_path), "busy")  # fmt: skip
    assert not driver._taken(cfg, store, str(tmp_path), "shan-y")
    (tmp_path / "checkpoints" / "shan-z").mkdir(parents=True)
    assert driver._taken(cfg, store, str(tmp_path), "shan-z")
