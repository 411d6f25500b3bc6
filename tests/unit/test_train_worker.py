"""The training worker's loop without Ray (``shan.train.worker``): what ``make_worker`` builds
on each rank (the MLflow logger only on rank 0, GloVe rows given by the driver), the agreement
between ranks on a non-finite loss or a user error, the tests' faults, an epoch over a fake data
shard, and the validator's share of the dev split. MLflow's logger and the collective calls are
fakes; no process group is started."""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
import shutil
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import shan.train.worker as worker
from shan.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrackingConfig,
)
from shan.data.format import DataError, load_vocab
from shan.data.reader import Batch, pad_tokens, read_split
from shan.data.synthetic import generate_synthetic
from shan.errors import CheckpointError, JobError
from shan.loss import BatchLoss
from shan.scoring import evaluate_split
from shan.tracking.names import flat_metrics
from shan.train import faults
from shan.train.faults import Faults
from shan.train.worker import (
    DONE,
    FAIL,
    GO,
    LoopSettings,
    Stop,
    Validator,
    agree,
    check_loss,
    epoch_batches,
    first_error,
    forward,
    make_worker,
    train_epoch,
)
from shan.vocab import Vocabulary
from tests.helpers import quiet

WORDS = ["a", "dog", "cat", "runs", "on", "the", "grass", "red", "ball", "man", "woman", "sits"]
F = 12  # feature size


def config(**sections) -> Config:
    base = dict(
        name="unit",
        seed=3,
        model=ModelConfig(feature_dim=F, d=16, word_dim=6, d_a=8),
        optim=OptimConfig(epochs=2, batch_size=4, lr=1e-3, lr_decay_epoch=1, warmup_steps=2),
        data=DataConfig(shuffle_buffer=0),
        tracking=TrackingConfig(log_every=2),
    )
    return Config(**{**base, **sections}).validate()


def settings(cfg: Config | None = None, vocab: Vocabulary | None = None, glove=None, faults=None):
    return LoopSettings(
        config=cfg or config(),
        vocab=vocab or Vocabulary(WORDS),
        glove=glove,
        mlflow_uri="http://mlflow.invalid",
        mlflow_run_id="r" * 32,
        fit_token="tok",
        data_root="",
        torch_threads=1,
        train_captions=0,
        faults=faults,
    )


class FakeLogger:
    """Stands for MetricLogger (which would reach MLflow)."""

    made: list[FakeLogger] = []

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id, self.logged = uri, run_id, []
        FakeLogger.made.append(self)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(metrics)))


@pytest.fixture(autouse=True)
def fake_logger(monkeypatch):
    FakeLogger.made = []
    monkeypatch.setattr(worker, "MetricLogger", FakeLogger)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is faster than contending for the CPUs (and restored after)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_kill(monkeypatch):
    """Never SIGKILL the test process: os.kill records instead."""
    kills: list[tuple[int, int]] = []
    monkeypatch.setattr(faults.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    return kills


def build(cfg: Config | None = None, rank: int = 0, world: int = 1, **kw):
    return make_worker(settings(cfg, **kw), torch.device("cpu"), rank=rank, world=world)


def changed(cfg: Config, section: str, **kw) -> Config:
    """``cfg`` with ``kw`` set in one of its sections."""
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **kw)})


# -- make_worker ----------------------------------------------------------------------------------
def test_only_rank_0_logs_to_mlflow():
    w0, w1 = build(rank=0, world=1), build(rank=1, world=2)
    assert isinstance(w0.logger, FakeLogger) and w1.logger is None
    assert len(FakeLogger.made) == 1
    assert (w0.logger.uri, w0.logger.run_id) == ("http://mlflow.invalid", "r" * 32)
    assert (w0.rank, w0.world, w1.rank, w1.world) == (0, 1, 1, 2)


def test_the_model_is_wrapped_only_when_there_are_several_workers():
    wrapped = []

    def wrap(model):
        wrapped.append(model)
        return torch.nn.Sequential(model)

    alone = make_worker(settings(), torch.device("cpu"), rank=0, world=1, wrap=wrap)
    assert isinstance(alone.model, BatchLoss) and alone.model.model is alone.core
    assert wrapped == []
    two = make_worker(settings(), torch.device("cpu"), rank=1, world=2, wrap=wrap)
    # DDP wraps the whole step (encode, gather, score, loss), so all of it is in its forward
    assert len(wrapped) == 1 and isinstance(wrapped[0], BatchLoss)
    assert two.model[0] is wrapped[0] and wrapped[0].model is two.core


def test_every_rank_starts_from_the_same_weights_and_optimizer_settings():
    cfg = changed(config(), "optim", weight_decay=0.01)
    a, b = build(cfg, rank=0, world=2), build(cfg, rank=1, world=2)
    for (name, p), q in zip(a.core.state_dict().items(), b.core.state_dict().values()):
        assert torch.equal(p, q), name
    group = a.optimizer.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (1e-3, 0.01)
    assert (a.state.epoch, a.state.step, a.state.best_rsum) == (0, 0, -np.inf)


@pytest.mark.parametrize("freeze", [True, False])
def test_the_drivers_glove_rows_are_the_models(freeze):
    vocab = Vocabulary(WORDS)
    glove = np.random.default_rng(0).normal(size=(len(vocab), 6)).astype(np.float32)
    glove.setflags(write=False)  # as Ray hands it over: read-only
    cfg = changed(config(), "model", freeze_glove=freeze)
    with warnings.catch_warnings():
        # e.g. torch's "The given NumPy array is not writable" (torch says it once a process,
        # so this catches it only when no earlier test made torch say it)
        warnings.simplefilter("error")
        w = build(cfg, vocab=vocab, glove=glove)
    emb = w.core.glove_emb.weight
    np.testing.assert_array_equal(emb.detach().numpy(), glove)
    assert emb.requires_grad is not freeze
    in_optimizer = any(p is emb for g in w.optimizer.param_groups for p in g["params"])
    assert in_optimizer is not freeze
    # the model holds its own copy: training it never writes into the driver's array
    assert not np.shares_memory(emb.detach().numpy(), glove)


def test_a_glove_matrix_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="GloVe matrix has shape"):
        build(glove=np.zeros((3, 6), np.float32))


def test_loop_settings_cross_processes_by_pickle():
    glove = np.arange(len(WORDS) * 6 + 24, dtype=np.float32).reshape(-1, 6)
    s = settings(glove=glove)
    back = pickle.loads(pickle.dumps(s))
    assert back.config == s.config and back.vocab == s.vocab
    np.testing.assert_array_equal(back.glove, glove)


# -- agreement between ranks ----------------------------------------------------------------------
def test_with_one_worker_agree_and_first_error_need_no_process_group():
    w = build()
    assert [agree(w, s) for s in (GO, DONE, FAIL)] == [GO, DONE, FAIL]
    e = DataError("dev/part-00000.parquet: truncated")
    assert first_error(w, e) == {"type": "DataError", "message": str(e)}
    assert first_error(w, None) == {"type": "JobError", "message": "a worker stopped the run"}


def test_agree_takes_the_lowest_state_of_all_ranks(monkeypatch):
    others = [GO]

    def all_reduce(t, op):
        assert op == torch.distributed.ReduceOp.MIN
        t.fill_(min([int(t.item()), *others]))

    monkeypatch.setattr(worker.dist, "all_reduce", all_reduce)
    w = build(rank=0, world=2)
    assert agree(w, GO) == GO and agree(w, DONE) == DONE
    others[:] = [FAIL]
    assert agree(w, GO) == FAIL
    others[:] = [DONE]
    assert agree(w, GO) == DONE and agree(w, FAIL) == FAIL


def test_first_error_is_the_lowest_failing_ranks_on_every_rank(monkeypatch):
    records = [
        None,
        {"type": "DataError", "message": "rank 1"},
        {"type": "JobError", "message": "rank 2"},
    ]

    def all_gather_object(parts, obj):
        parts[:] = records

    monkeypatch.setattr(worker.dist, "all_gather_object", all_gather_object)
    w = build(rank=0, world=3)
    assert first_error(w, None) == {"type": "DataError", "message": "rank 1"}
    records[:] = [None, None, None]
    assert first_error(w, None)["message"] == "a worker stopped the run"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_every_rank_naming_epoch_and_step(bad):
    w = build()
    w.state.epoch, w.state.step = 2, 17
    check_loss(w, torch.tensor(0.5))  # finite: goes on
    with pytest.raises(Stop) as stop:
        check_loss(w, torch.tensor(bad))
    assert isinstance(stop.value.error, JobError)
    assert f"non-finite loss ({bad}) at epoch 3, step 17" in str(stop.value.error)
    assert "lower optim.lr" in str(stop.value)


def test_a_rank_with_a_finite_loss_stops_too_when_another_failed(monkeypatch):
    monkeypatch.setattr(worker, "agree", lambda w, state: FAIL)
    w = build(rank=0, world=2)
    with pytest.raises(Stop) as stop:
        check_loss(w, torch.tensor(0.5))
    assert stop.value.error is None  # the failing rank's error is found by first_error


# -- the tests' faults ----------------------------------------------------------------------------
def at_step(w, batch=None):
    return faults.at_step(w.faults, w.state.step, w.rank, w.world, batch)


def test_the_error_fault_raises_on_the_last_rank_at_its_step_only():
    at_step(build())  # no faults: nothing
    f = Faults(fail_with="DataError", fail_at_step=3)
    w = build(faults=f)
    for step in (0, 2, 4):
        w.state.step = step
        at_step(w)
    w.state.step = 3
    with pytest.raises(DataError, match="debug: DataError on rank 0 at step 3"):
        at_step(w)
    first = build(rank=0, world=2, faults=f)  # not the last rank
    first.state.step = 3
    at_step(first)
    last = build(rank=1, world=2, faults=f)
    last.state.step = 3
    with pytest.raises(DataError, match="on rank 1 at step 3"):
        at_step(last)


def test_the_start_fault_raises_on_the_last_rank_only():
    f = Faults(fail_with="CheckpointError")
    shard = object()
    assert faults.at_start(None, shard, rank=1, world=2, epoch=0) is shard
    assert faults.at_start(f, shard, rank=0, world=2, epoch=0) is shard
    with pytest.raises(CheckpointError, match="debug: CheckpointError on rank 1 at start"):
        faults.at_start(f, shard, rank=1, world=2, epoch=0)
    at_step_only = Faults(fail_with="CheckpointError", fail_at_step=0)
    assert faults.at_start(at_step_only, shard, rank=1, world=2, epoch=0) is shard


def test_the_kill_fault_fires_once_on_the_last_rank_with_a_marker(tmp_path, no_kill):
    marker = tmp_path / "killed"
    at_step(build())  # no faults
    no_marker = build(faults=Faults(kill_worker_at_step=0))
    at_step(no_marker)
    other_step = build(faults=Faults(kill_worker_at_step=1, kill_marker=str(marker)))
    at_step(other_step)
    f = Faults(kill_worker_at_step=0, kill_marker=str(marker))
    at_step(build(rank=0, world=2, faults=f))
    assert no_kill == [] and not marker.exists()

    w = build(rank=1, world=2, faults=f)
    at_step(w)  # os.kill is the fixture's recorder
    assert [sig for _, sig in no_kill] == [signal.SIGKILL]
    assert marker.read_text() == "killed rank 1 at step 0\n"
    at_step(w)  # the marker is there: once only
    assert len(no_kill) == 1


@pytest.mark.parametrize(
    "text, problem",
    [
        ('{"nan_at_step": -1}', "nan_at_step must be an integer >= 0, got -1"),
        ('{"fail_at_step": "2"}', "fail_at_step must be an integer >= 0, got '2'"),
        ('{"fail_with": "KeyError"}', "fail_with must be one of ConfigError, DataError"),
        ('{"rows_log": ""}', "rows_log must be a non-empty text"),
        ('{"nan_at": 1}', "unknown nan_at"),
        ("[1]", "must hold a JSON object"),
    ],
)
def test_faults_are_checked_where_they_are_read(monkeypatch, text, problem):
    monkeypatch.setenv(faults.ENV, text)
    with pytest.raises(ValueError, match=re.escape(problem)):
        faults.from_env()


def test_faults_travel_in_the_environment(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.from_env() is None
    ((key, value),) = faults.env(nan_at_step=3, rows_log="/tmp/rows").items()
    monkeypatch.setenv(key, value)
    assert faults.from_env() == Faults(nan_at_step=3, rows_log="/tmp/rows")
    with pytest.raises(ValueError, match="fail_with must be one of"):
        faults.env(fail_with="Nope")


def batch(cfg: Config, vocab: Vocabulary, images=4, per=2, seed=0) -> Batch:
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(images, 5, cfg.model.feature_dim)).astype(np.float32)
    caps = [[1, *rng.integers(4, len(vocab), size=3).tolist(), 2] for _ in range(images * per)]
    tokens, lengths = pad_tokens(caps)
    rows = np.repeat(np.arange(images), per)
    return Batch(torch.from_numpy(feats[rows]), torch.full((images * per,), 5), tokens, lengths,
                 torch.from_numpy(rows))  # fmt: skip


def test_the_nan_fault_poisons_the_last_ranks_loss_at_its_step():
    f = Faults(nan_at_step=1)
    w = build(faults=f)
    b = batch(w.cfg, w.vocab)
    assert torch.isfinite(forward(w, at_step(w, b)))  # step 0
    w.state.step = 1
    assert torch.isnan(forward(w, at_step(w, b)))
    assert at_step(w, None) is None  # no batch left: nothing to poison
    first = build(rank=0, world=2, faults=f)
    first.state.step = 1
    assert torch.isfinite(forward(first, at_step(first, b)))


# -- an epoch over a fake shard -------------------------------------------------------------------
def epoch(w, shard, steps_hint: int) -> dict[str, float]:
    """One epoch of ``w`` over ``shard`` as the worker runs it: its stats."""
    return train_epoch(w, epoch_batches(w, shard), steps_hint).stats()


class FakeShard:
    """What ``ray.train.get_dataset_shard`` gives: image rows in numpy batches; ``fail_after``
    batches, the next one raises ``error`` (a damaged file)."""

    def __init__(self, images=6, per=2, chunk=2, fail_after=None, error=None, seed=0):
        rng = np.random.default_rng(seed)
        self.rows = {
            "image_id": np.arange(100, 100 + images),
            "features": rng.normal(size=(images, 5, F)).astype(np.float32),
            "num_regions": rng.integers(2, 6, size=images).astype(np.int32),
            "tokens": [
                [[1, *rng.integers(4, 16, size=4).tolist(), 2] for _ in range(per)]
                for _ in range(images)
            ],
        }
        self.images, self.chunk, self.fail_after, self.error = images, chunk, fail_after, error

    def iter_batches(self, batch_size, batch_format, prefetch_batches):
        assert batch_format == "numpy"
        for n, i in enumerate(range(0, self.images, self.chunk)):
            if n == self.fail_after:
                raise self.error
            yield {k: v[i : i + self.chunk] for k, v in self.rows.items()}


def test_an_epoch_takes_every_full_batch_and_logs_on_rank_0(capsys):
    w = build()
    before = [p.detach().clone() for p in w.core.parameters()]
    stats = epoch(w, FakeShard(images=6, per=2), steps_hint=3)
    assert w.state.step == 3  # 12 examples, batches of 4
    assert set(stats) == {"train/epoch_loss", "train/epoch_examples_per_s", "train/data_wait"}
    assert np.isfinite(stats["train/epoch_loss"]) and 0 <= stats["train/data_wait"] <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, w.core.parameters()))
    ((step, logged),) = w.logger.logged  # every 2 steps: once in 3
    assert step == 2 and set(logged) == {
        "train/loss", "train/lr", "train/examples_per_s", "train/workers"
    }  # fmt: skip
    assert logged["train/workers"] == 1  # the world size, with each step's points
    assert logged["train/lr"] == pytest.approx(1e-3)  # step 1 after a 2-step warm-up
    assert w.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert "epoch 1/2 step 2/~3 loss" in capsys.readouterr().out


def test_an_epoch_sets_the_warm_up_rate_of_each_step():
    w = build()
    rates = []
    original = worker.forward

    def spy(w, b):
        rates.append(w.optimizer.param_groups[0]["lr"])
        return original(w, b)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(worker, "forward", spy)
        epoch(w, FakeShard(images=6, per=2), steps_hint=3)
    assert rates == pytest.approx([5e-4, 1e-3, 1e-3])


def test_a_non_finite_loss_stops_the_epoch_before_any_update():
    w = build(faults=Faults(nan_at_step=0))
    before = [p.detach().clone() for p in w.core.parameters()]
    with pytest.raises(Stop) as stop:
        epoch(w, FakeShard(), steps_hint=3)
    assert "non-finite loss (nan) at epoch 1, step 0" in str(stop.value.error)
    assert w.state.step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, w.core.parameters()))


def test_the_rows_log_holds_the_rows_of_each_finished_pass(tmp_path):
    """Each rank writes the image rows it read in an epoch (numbered on from the checkpoint's)
    once its pass is over; an epoch that stops writes nothing."""
    w = build(faults=Faults(rows_log=str(tmp_path)))
    w.state.epoch = 1  # resumed after epoch 1
    shard = faults.at_start(w.faults, FakeShard(images=6, per=2), rank=0, world=1, epoch=1)
    epoch(w, shard, steps_hint=3)
    (written,) = tmp_path.iterdir()
    assert written.name == "epoch2-rank0.json"
    record = json.loads(written.read_text())
    assert record["rank"] == 0 and record["node"]
    assert record["rows"] == [[100 + i, 2] for i in range(6)]
    error = DataError("train/part-00001.parquet: truncated")
    stopping = faults.at_start(w.faults, FakeShard(fail_after=1, error=error), rank=0, world=1,
                               epoch=2)  # fmt: skip
    with pytest.raises(Stop):
        epoch(w, stopping, steps_hint=3)
    assert [p.name for p in tmp_path.iterdir()] == ["epoch2-rank0.json"]


def test_a_damaged_file_mid_epoch_stops_with_its_error():
    error = DataError("train/part-00001.parquet: not a readable Parquet file")
    w = build()
    with pytest.raises(Stop) as stop:
        epoch(w, FakeShard(images=6, chunk=2, fail_after=1, error=error), steps_hint=3)
    assert stop.value.error is error and w.state.step == 1


def test_the_injected_error_stops_the_epoch_at_its_step():
    w = build(faults=Faults(fail_with="CheckpointError", fail_at_step=2))
    with pytest.raises(Stop) as stop:
        epoch(w, FakeShard(), steps_hint=3)
    assert type(stop.value.error).__name__ == "CheckpointError" and w.state.step == 2


def test_a_worker_without_a_single_batch_stops_the_run():
    w = build()
    with pytest.raises(Stop) as stop:
        epoch(w, FakeShard(images=1, per=2), steps_hint=0)  # 2 examples < batch of 4
    assert isinstance(stop.value.error, JobError)
    assert "smaller than the global batch (optim.batch_size)" in str(stop.value.error)


# -- the global batch shared out among the workers ------------------------------------------------
@pytest.mark.parametrize(
    "batch_size, world, rank, each",
    [(4, 1, 0, 4), (4, 2, 1, 2), (5, 2, 0, 3), (5, 2, 1, 2), (7, 3, 0, 3), (7, 3, 2, 2)],
)
def test_each_worker_takes_its_share_of_the_global_batch(
    monkeypatch, batch_size, world, rank, each
):
    """``optim.batch_size`` is the global batch: each worker's steps take ``batch_size //
    world`` examples, the first ``batch_size % world`` ranks one more (the other ranks agree,
    as they would through the process group)."""
    monkeypatch.setattr(worker.dist, "all_reduce", lambda t, op: None)
    sizes = []
    original = worker.forward

    def spy(w, b):
        sizes.append(len(b))
        return original(w, b)

    monkeypatch.setattr(worker, "forward", spy)
    w = build(changed(config(), "optim", batch_size=batch_size), rank=rank, world=world)
    epoch(w, FakeShard(images=6, per=2), steps_hint=3)  # 12 examples
    assert sizes == [each] * (12 // each)


@pytest.mark.parametrize(
    "batch_size, world, hint", [(4, 1, 25), (4, 2, 25), (5, 2, 20), (7, 3, 14)]
)
def test_the_steps_hint_counts_global_batches_at_any_world_size(batch_size, world, hint):
    w = build(changed(config(), "optim", batch_size=batch_size), rank=0, world=world)
    assert worker.epoch_steps(w, 100) == 100 // batch_size == hint


def test_each_group_says_its_size_and_split_once_on_rank_0(capsys):
    even = build(changed(config(), "optim", batch_size=6), rank=0, world=3)
    worker.announce_group(even)
    assert capsys.readouterr().out == "workers: 3; batch 6 = 2 + 2 + 2\n"
    assert even.logger.logged == [(0, {"train/workers": 3})]
    odd = build(changed(config(), "optim", batch_size=7), rank=1, world=3)
    worker.announce_group(odd)  # rank 1: nothing
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize(
    "batch_size, world, workers, line",
    [
        (32, 2, [1, 2], "workers: 2 (elastic 1-2); batch 32 = 16 + 16"),
        (33, 2, [1, 2], "workers: 2 (elastic 1-2); batch 33 = 17 + 16 (33 does not divide "
                        "over 2 workers: rank 0 takes one more example)"),
        (7, 4, 4, "workers: 4; batch 7 = 2 + 2 + 2 + 1 (7 does not divide over 4 workers: "
                  "ranks 0-2 take one more example)"),
        (100, 12, [4, 12], "workers: 12 (elastic 4-12); batch 100 = 4 x 9 + 8 x 8 (100 does "
                           "not divide over 12 workers: ranks 0-3 take one more example)"),
    ],
)  # fmt: skip
def test_the_batch_line_names_the_ranks_that_take_one_more(batch_size, world, workers, line):
    cfg = changed(changed(config(), "optim", batch_size=batch_size), "scaling",
                  num_workers=workers)  # fmt: skip
    assert worker.batch_line(build(cfg, rank=0, world=world)) == line


def test_a_global_batch_smaller_than_the_workers_stops_before_training():
    w = build(changed(config(), "optim", batch_size=2), rank=0, world=3)
    with pytest.raises(ConfigError, match=r"optim.batch_size \(2\).*number of workers \(3\)"):
        worker.epoch_steps(w, 100)
    with pytest.raises(ConfigError, match="optim.batch_size"):
        epoch(w, FakeShard(), steps_hint=3)


def test_the_logged_loss_is_the_global_batchs(monkeypatch):
    """Each worker's loss is its share's part; the step returns their sum (all-reduced), and
    every rank checks that sum, so a non-finite share stops every rank."""
    w = build(rank=0, world=2)
    share = forward(w, batch(w.cfg, w.vocab))  # no process group: this worker's share alone
    others = [0.25]  # the other rank's share

    def all_reduce(t, op=torch.distributed.ReduceOp.SUM):
        assert op == torch.distributed.ReduceOp.SUM
        t += others[0]

    monkeypatch.setattr(worker.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(worker.dist, "all_reduce", all_reduce)
    total = worker.batch_loss(w, share)
    assert total.item() == pytest.approx(share.item() + 0.25) and not total.requires_grad
    others[0] = float("nan")
    assert torch.isnan(worker.batch_loss(w, share))


def test_a_programming_error_is_not_turned_into_a_stop():
    w = build()
    with pytest.raises(KeyError):
        epoch(w, FakeShard(fail_after=1, error=KeyError("bug")), steps_hint=3)


# -- validation -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dev_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "synthetic"
    generate_synthetic(str(root), images={"train": 4, "dev": 9}, regions=4, feature_dim=F,
                       concepts=12, captions_per_image=2, log=quiet)  # fmt: skip
    return str(root)


def validator_worker(root: str, rank=0, world=1, **data):
    cfg = dataclasses.replace(config(), data=DataConfig(**data))
    return build(cfg, rank=rank, world=world, vocab=load_vocab(root))


@pytest.mark.parametrize("world", [1, 2, 3, 4, 9, 11])
def test_validation_rows_are_shared_out_without_gaps_or_overlap(dev_set, world):
    shares = [Validator(validator_worker(dev_set, r, world), dev_set).rows for r in range(world)]
    rows = [i for s in shares for i in range(9)[s]]
    assert rows == list(range(9))
    sizes = [len(range(9)[s]) for s in shares]
    assert max(sizes) - min(sizes) <= 1


def test_the_validator_reads_the_configured_split_and_cap(dev_set):
    v = Validator(validator_worker(dev_set, val_split="train"), dev_set)
    assert len(v.data.image_ids) == 4
    v = Validator(validator_worker(dev_set, val_max_images=5), dev_set)
    assert len(v.data.image_ids) == 5 and v.rows == slice(0, 5)
    assert v.data.caption_image.max() == 4 and len(v.data.tokens) == 10
    with pytest.raises(DataError, match="has no split 'test'"):
        Validator(validator_worker(dev_set, val_split="test"), dev_set)


def test_two_ranks_shares_give_the_one_ranks_metrics(dev_set, monkeypatch):
    w = validator_worker(dev_set)
    alone = Validator(w, dev_set)(w)
    want = flat_metrics(evaluate_split(w.core, read_split(dev_set, "dev"), w.device))
    assert set(alone) == set(want) and "val/rsum" in alone and "val/l2l/rsum" in alone
    assert alone == pytest.approx(want)

    # rank 1 scores its rows first; rank 0 then "gathers" them after its own
    pieces = {}

    def gather(parts, sims):
        if "rank0" in pieces:  # rank 0's own rows, then rank 1's
            parts[:] = [sims, pieces["rank1"]]
        else:  # rank 1: keep its rows; the stand-in for rank 0's is cut from them
            pieces["rank1"] = sims
            parts[:] = [{k: v[:4] for k, v in sims.items()}, sims]

    monkeypatch.setattr(worker.dist, "all_gather_object", gather)
    w1 = validator_worker(dev_set, rank=1, world=2)
    w1.core.load_state_dict(w.core.state_dict())
    Validator(w1, dev_set)(w1)
    pieces["rank0"] = True
    w0 = validator_worker(dev_set, rank=0, world=2)
    w0.core.load_state_dict(w.core.state_dict())
    v0 = Validator(w0, dev_set)
    assert v0.rows == slice(0, 4) and pieces["rank1"]["total"].shape == (5, 18)
    assert v0(w0) == pytest.approx(alone, rel=1e-5)


@pytest.mark.parametrize(
    ("error", "oom"),
    [
        (MemoryError(), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 37.25 GiB"), True),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate "
                "memory: you tried to allocate 400000000000 bytes"
            ),
            True,
        ),  # fmt: skip
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), False),
    ],
)
def test_out_of_memory_is_recognised(error, oom):
    assert worker.out_of_memory(error) is oom


# -- report: the checkpoint's upload --------------------------------------------------------------
@pytest.mark.parametrize("mode", ["async", "sync"])
def test_the_checkpoint_folder_outlives_an_async_report_and_not_a_sync_one(monkeypatch, mode):
    """async: Ray uploads the folder after ``report`` returns and deletes it then (we must not);
    sync: the upload is done when ``report`` returns, and the folder is ours to delete."""
    import ray.train

    from shan.checkpoint import load_checkpoint

    calls = []

    def fake_report(metrics, *, checkpoint=None, **kw):
        calls.append((checkpoint.path, kw, load_checkpoint(checkpoint.path).epoch))

    monkeypatch.setattr(ray.train, "report", fake_report)
    w = build(changed(config(), "tracking", checkpoint_upload=mode))
    w.state.epoch = 3
    worker.report(w, {"epoch": 3, "val/rsum": 1.0})
    ((path, kw, epoch),) = calls
    assert epoch == 3 and kw["checkpoint_upload_mode"].value == mode.upper()
    if mode == "async":
        assert kw["delete_local_checkpoint_after_upload"] is True
        assert Path(path).is_dir()  # left for Ray's upload thread
        shutil.rmtree(path)
    else:
        assert not Path(path).exists()
