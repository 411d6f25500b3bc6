"""The training driver's checks that need neither Ray nor MLflow (``shan.train.driver``):
generated run names, the local checkpoint copy that replaces only a checkpoint folder, and a
failed worker group turned into the error to raise."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from shan.config import (
    Config,
    ConfigError,
    OptimConfig,
    ScalingConfig,
    load_config,
    name_problem,
)
from shan.data.format import DataError
from shan.errors import JobError
from shan.train import driver


def test_a_dev_recall_on_part_of_the_split_says_so():
    from shan.tracking.notes import training_note

    assert driver.dev_scope(load_config(None, [])) == ""
    scope = driver.dev_scope(load_config(None, ["data.val_max_images=250"]))
    assert scope == " on the first 250 dev images (data.val_max_images)"
    assert driver.dev_scope(load_config("demo")) == scope  # the demo validates on half of dev
    assert "best epoch (2) on the first 250 dev images" in training_note("r", 2, "|t|", scope)


def test_generated_names_are_new_and_valid():
    cfg = load_config(None, ["name=demo"])
    names = {driver.new_run_name(cfg) for _ in range(2000)}
    assert len(names) == 2000
    assert all(name_problem(n) is None and n.startswith("shan-demo-") for n in names)
    seen = []
    name = driver.new_run_name(cfg, lambda n: seen.append(n) or len(seen) < 3)
    assert name == seen[-1] and len(seen) == 3
    with pytest.raises(JobError, match="no unused run name"):
        driver.new_run_name(cfg, lambda n: True)


def test_the_tests_tiny_config_fits_a_two_cpu_head():
    """The integration suite's head has 2 CPUs: the tiny config's two workers get half a CPU
    each, the default config one worker of one CPU (one CPU left to Ray Data's reads)."""
    from shan.config import ScalingConfig
    from shan.runtime import size_group, training_request
    from tests.helpers import TINY

    tiny = load_config(TINY).scaling
    r = size_group(training_request(tiny), {"CPU": 2.0})
    assert (r.count, r.cpus_each, r.use_gpu, r.torch_threads) == (2, 0.5, False, 1)
    r = size_group(training_request(ScalingConfig()), {"CPU": 2.0})
    assert (r.count, r.cpus_each) == (1, 1.0)


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


def test_a_global_batch_smaller_than_the_workers_is_refused_before_any_run(monkeypatch):
    """With ``scaling.num_workers`` set, the split of the global batch is checked before the
    data set, MLflow or Ray are touched."""

    def untouched(*args, **kwargs):
        raise AssertionError("touched before the config was checked")

    monkeypatch.setattr(driver, "check_data", untouched)
    monkeypatch.setattr(driver, "ensure_demo_data", untouched)
    cfg = Config(optim=OptimConfig(batch_size=2), scaling=ScalingConfig(num_workers=3))
    with pytest.raises(ConfigError, match=r"optim.batch_size \(2\).*number of workers \(3\)"):
        driver.run_training(cfg, data="unused")


@pytest.mark.parametrize(("address", "refused"), [(None, True), ("local", True), ("auto", False)])
def test_a_local_gpu_ask_without_a_gpu_is_refused_before_anything(monkeypatch, address, refused):
    """f30k asks for a GPU worker: locally, on a machine without one, that is one config
    error before Ray, MLflow or the data are touched; on a cluster the job asks and waits."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    if address is not None:
        monkeypatch.setenv("RAY_ADDRESS", address)
    cfg = load_config("f30k")
    if refused:
        with pytest.raises(ConfigError, match=r"scaling.use_gpu is true \(1 GPU asked for\)"):
            driver.check_local_gpus(cfg.scaling)
    else:
        driver.check_local_gpus(cfg.scaling)
    cfg.scaling.use_gpu = False
    driver.check_local_gpus(cfg.scaling)  # asks for none: fine anywhere
