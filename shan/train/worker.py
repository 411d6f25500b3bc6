"""The loop each Ray Train worker runs: DDP training of SHAN with the triplet loss, validation
sharded over the workers after each epoch, and a checkpoint reported through Ray Train.

User errors (a non-finite loss, a damaged data file, ...) would recur on a retry, so they end
the run instead of restarting the workers: at each step the ranks agree, with the all-reduce
that already tells them whether every rank has a batch, on whether any rank failed; then all
leave the loop together, rank 0 leaves the first error (type and message) in a tag of the
MLflow run (:class:`~shan.tracking.runs.FatalBox`), and the loop returns normally, so Ray Train
does not retry it. The driver raises the same error type. A user error raised outside the steps
is left in the box too and fails the worker group; should Ray Train restart it, the new workers
find the error in the box and stop at once. A worker that dies is restarted as before.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from shan.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shan.config import Config
from shan.data.reader import Batch, ExampleStream, read_split
from shan.errors import USER_ERRORS, JobError, to_record
from shan.loss import BatchLoss
from shan.model import SHAN
from shan.progress import quiet_ray_train_reports
from shan.scoring import autocast, score_matrix, split_metrics
from shan.tracking.names import flat_metrics
from shan.tracking.runs import FatalBox, MetricLogger
from shan.tracking.system import SystemMetrics
from shan.train import faults
from shan.train.faults import Faults
from shan.vocab import Vocabulary

if TYPE_CHECKING:
    from ray.data import DataIterator


@dataclass
class LoopSettings:
    """What the driver gives every worker (``train_loop_config``), typed."""

    config: Config
    vocab: Vocabulary
    glove: np.ndarray | None  # (V, word_dim) float32 GloVe rows for the frozen half, or None
    mlflow_uri: str
    mlflow_run_id: str
    fit_token: str  # this training's token in the FatalBox
    data_root: str
    torch_threads: int
    train_captions: int  # captions in the train split (for the steps estimate)
    faults: Faults | None = None  # the tests' (SHAN_TEST_FAULTS); None: none


def say(line: str) -> None:
    """One line to the driver's output. Ray Train replaces ``print`` in its workers with a
    version that both prints and logs, so each printed line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


GO, DONE, FAIL = 2, 1, 0  # a rank's vote at a step; the ranks agree on the lowest


class Stop(Exception):
    """Every rank leaves the loop together: some rank raised ``error`` (None on the others)."""

    def __init__(self, error: BaseException | None) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class TrainState:
    """Where the training is: what a checkpoint holds besides weights and optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_rsum: float = -math.inf


@dataclass(kw_only=True)
class Worker:
    """What one worker holds for the whole run."""

    cfg: Config
    vocab: Vocabulary
    model: torch.nn.Module  # the BatchLoss of ``core``, DDP-wrapped when there are several workers
    core: SHAN
    optimizer: torch.optim.Optimizer
    device: torch.device
    rank: int
    world: int
    logger: MetricLogger | None
    state: TrainState
    faults: Faults | None = None


def lr_at(cfg: Config, epoch: int, step: int) -> float:
    """Step decay at ``lr_decay_epoch``, after an optional linear warm-up."""
    o = cfg.optim
    lr = o.lr * (o.lr_decay if epoch >= o.lr_decay_epoch else 1.0)
    if o.warmup_steps and step < o.warmup_steps:
        lr *= (step + 1) / o.warmup_steps
    return lr


def make_worker(
    settings: LoopSettings,
    device: torch.device,
    rank: int = 0,
    world: int = 1,
    wrap: Any = None,
) -> Worker:
    """A worker's model, optimizer and loss, without Ray: ``wrap`` (DDP's ``prepare_model``)
    wraps the model's :class:`~shan.loss.BatchLoss` when there are several workers. The golden
    test builds one this way."""
    cfg = settings.config
    torch.manual_seed(cfg.seed)
    glove = (
        None if settings.glove is None else torch.tensor(settings.glove)
    )  # a copy: Ray's is read-only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        core = SHAN(cfg.model, len(settings.vocab), glove=glove)
    step = BatchLoss(core, cfg.loss)  # encode, gather, score, loss: one forward for DDP
    model = wrap(step) if wrap is not None and world > 1 else step.to(device)
    params = [p for p in core.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    logger = MetricLogger(settings.mlflow_uri, settings.mlflow_run_id) if rank == 0 else None
    return Worker(
        cfg=cfg,
        vocab=settings.vocab,
        model=model,
        core=core,
        optimizer=optimizer,
        device=device,
        rank=rank,
        world=world,
        logger=logger,
        state=TrainState(),
        faults=settings.faults,
    )


def build_worker(settings: LoopSettings) -> Worker:
    """This Ray Train worker's :class:`Worker`, resumed from Ray's checkpoint if there is one."""
    import ray.train
    import ray.train.torch

    quiet_ray_train_reports()  # Ray Train's per-report metric dump: its log file only
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(settings.torch_threads)
    device = ray.train.torch.get_device()
    say(f"rank {rank} of {world} on node {node_address()} ({device}, pid {os.getpid()})")
    w = make_worker(settings, device, rank, world, wrap=ray.train.torch.prepare_model)
    restore(w)
    return w


def node_address() -> str:
    """The address of the Ray node this process runs on."""
    import ray.util

    return str(ray.util.get_node_ip_address())


def restore(w: Worker) -> None:
    """Weights, optimizer state and training state from Ray Train's latest checkpoint, if
    any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        saved = load_checkpoint(d)
    w.core.load_state_dict(saved.weights)
    if saved.optimizer is not None:
        w.optimizer.load_state_dict(saved.optimizer)
    w.state = TrainState(saved.epoch, saved.step, saved.best_rsum)
    if w.rank == 0 and w.logger is not None:
        say(f"resumed from the checkpoint of epoch {w.state.epoch}, step {w.state.step}")
        w.logger.log({"train/resumed_at_epoch": w.state.epoch}, step=w.state.step)


def agree(w: Worker, vote: int) -> int:
    """The lowest ``vote`` of all ranks: FAIL if any rank failed, else DONE if any rank has
    no batch left (DDP needs equal step counts), else GO."""
    if w.world == 1:
        return vote
    flag = torch.tensor([vote], device=w.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return int(flag.item())


def first_error(w: Worker, error: BaseException | None) -> dict[str, Any]:
    """The record (type, message) of the lowest rank's error, on every rank."""
    record = to_record(error) if error is not None else None
    if w.world > 1:
        parts: list[Any] = [None] * w.world
        dist.all_gather_object(parts, record)
        record = next((p for p in parts if p), None)
    return record or {"type": "JobError", "message": "a worker stopped the run"}


def forward(w: Worker, batch: Batch) -> torch.Tensor:
    """This worker's share of the global batch -> its loss (scalar, not yet checked): with
    ``loss.negatives_from: global`` its part of the global batch's loss, else its own share's."""
    b = batch.to(w.device, next(w.core.parameters()).dtype)  # features as the model's weights
    sc = w.cfg.scaling
    with autocast(w.device, sc.bf16):
        loss = w.model(
            b.features,
            b.num_regions,
            b.tokens,
            b.lengths,
            image_ids=b.image_ids,
            block=sc.score_block,
            checkpoint=sc.checkpoint_blocks,
        )
    return loss


def batch_loss(w: Worker, loss: torch.Tensor) -> torch.Tensor:
    """The global batch's loss (scalar, detached): the sum of every worker's ``loss``, the
    number one worker would log for the whole batch. Non-finite on every rank when any rank's
    is."""
    total = loss.detach().clone()  # ()
    if w.world > 1 and dist.is_initialized():
        dist.all_reduce(total)
    return total


def first_stage_part(w: Worker) -> torch.Tensor | None:
    """The first stage's part of the last step's global loss (the sum of every rank's, detached;
    :meth:`BatchLoss.first_stage`), None without a first stage: SHAN's own loss is the rest."""
    if w.core.first_stage is None:
        return None
    step = getattr(w.model, "module", w.model)  # the BatchLoss (DDP wraps it)
    part = getattr(step, "first_stage_part", None)
    return None if part is None else batch_loss(w, part)


def check_loss(w: Worker, loss: torch.Tensor) -> None:
    """Every rank goes on only when every rank's loss is finite (before backward, whose
    gradient all-reduce would otherwise wait for the rank that stopped)."""
    error = None
    if not torch.isfinite(loss):
        error = JobError(
            f"non-finite loss ({loss.item()}) at epoch {w.state.epoch + 1}, "
            f"step {w.state.step}: lower optim.lr or check the data"
        )
    if agree(w, FAIL if error else GO) == FAIL:
        raise Stop(error)


def train_epoch(w: Worker, batches: Iterable[Batch], steps_hint: int) -> Meter:
    """One epoch: an optimizer step per global batch, of which ``batches`` are this rank's
    shares (:func:`epoch_batches`). The global batch's loss is the sum of the ranks' losses and
    DDP averages the gradients over the ranks, so each rank backpropagates ``world`` times its
    loss: the averaged gradient is the global batch's, as one worker would compute it."""
    cfg, meter = w.cfg, Meter(w, steps_hint)
    w.model.train()
    for batch in agreed(w, iter(batches), meter):  # every rank has one, none failed
        lr = lr_at(cfg, w.state.epoch, w.state.step)
        for group in w.optimizer.param_groups:
            group["lr"] = lr
        loss = forward(w, batch)  # this rank's share of the global batch's loss
        total = batch_loss(w, loss)  # the global batch's loss, on every rank
        check_loss(w, total)  # every rank goes on, or every rank stops
        head = first_stage_part(w)  # the first stage's part of it (logged apart), or None
        w.optimizer.zero_grad(set_to_none=True)
        (loss * w.world).backward()
        clip_gradients(w.core, cfg.optim.grad_clip)
        w.optimizer.step()
        w.state.step += 1
        if head is None:
            meter.step(total.item(), len(batch), lr)  # rank 0 logs every log_every steps
        else:
            meter.step(
                total.item() - head.item(), len(batch), lr, first_stage=head.item() / w.world
            )
    if not meter.losses:  # the ranks stopped at the same step, so all of them are here
        raise Stop(JobError("this worker got no training batch: the train split is smaller "
                            "than the global batch (optim.batch_size)"))  # fmt: skip
    return meter


def clip_gradients(core: SHAN, max_norm: float) -> None:
    """Clip SHAN's gradient norm to ``max_norm``, and the first stage's (if any) on its own:
    one norm over both would let the head's gradients scale SHAN's steps."""
    shan: list[torch.nn.Parameter] = []
    head: list[torch.nn.Parameter] = []
    for name, p in core.named_parameters():
        (head if name.startswith("first_stage.") else shan).append(p)
    torch.nn.utils.clip_grad_norm_(shan, max_norm)
    if head:
        torch.nn.utils.clip_grad_norm_(head, max_norm)


def epoch_batches(w: Worker, shard: DataIterator) -> Iterator[Batch]:
    """This rank's batches of an epoch (its share of ``optim.batch_size``:
    ``OptimConfig.batch_shares``), made from the image rows of its data shard."""
    cfg = w.cfg
    stream = ExampleStream(
        cfg.optim.worker_batch(w.world, w.rank),
        cfg.data.shuffle_buffer,
        cfg.data.max_words,
        seed=[cfg.seed, w.state.epoch, w.rank],
    )
    return stream(shard.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=2))


def agreed(w: Worker, batches: Iterator[Batch], meter: Meter) -> Iterator[Batch]:
    """``batches`` while every rank has one and none failed, so that the ranks take the same
    steps. A user error on any rank (a damaged file, ...) stops them all (:class:`Stop`); when
    any rank runs out, the rest of this rank's batches is read and dropped (the next epoch
    starts clean). The tests' faults come in here (:func:`shan.train.faults.at_step`)."""
    while True:
        error, batch = None, None
        with meter.waiting():
            try:
                batch = next(batches, None)
                batch = faults.at_step(w.faults, w.state.step, w.rank, w.world, batch)
            except USER_ERRORS as e:  # every rank stops with it
                error, batch = e, None
        vote = agree(w, FAIL if error else GO if batch is not None else DONE)
        if vote == FAIL:
            raise Stop(error)
        if vote == DONE:
            break
        assert batch is not None  # this rank voted GO: it has a batch
        yield batch
    for _ in batches:
        pass


class Meter:
    """An epoch's losses (of the global batches), examples and data wait; on rank 0 (the one
    with a logger) a line and MLflow points every ``tracking.log_every`` steps."""

    def __init__(self, w: Worker, steps_hint: int) -> None:
        self.w, self.steps_hint = w, steps_hint
        self.losses: list[float] = []  # SHAN's
        self.first_stage: list[float] = []  # the first stage's (its mean over the ranks)
        self.examples, self.wait = 0, 0.0
        self.t_start = self.t_log = time.perf_counter()
        self.ex_log = 0

    @contextmanager
    def waiting(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wait += time.perf_counter() - t0

    def step(self, loss: float, examples: int, lr: float, first_stage: float | None = None) -> None:
        self.losses.append(loss)
        if first_stage is not None:
            self.first_stage.append(first_stage)
        self.examples += examples
        w, every = self.w, self.w.cfg.tracking.log_every
        if w.logger is None or len(self.losses) % every:
            return
        now = time.perf_counter()
        rate = (self.examples - self.ex_log) / (now - self.t_log)
        self.t_log, self.ex_log = now, self.examples
        recent = float(np.mean(self.losses[-every:]))
        say(
            f"epoch {w.state.epoch + 1}/{w.cfg.optim.epochs} step {len(self.losses)}/"
            f"~{self.steps_hint} loss {recent:.4f} lr {lr:.2e} {rate:.0f} examples/s per worker"
        )
        points = {
            "train/loss": recent,
            "train/lr": lr,
            "train/examples_per_s": rate,
            "train/workers": w.world,
        }
        if self.first_stage:
            points["train/first_stage_loss"] = float(np.mean(self.first_stage[-every:]))
        w.logger.log(points, step=w.state.step)

    def stats(self) -> dict[str, float]:
        """The mean loss of the global batches, examples/s and the share of the time spent
        waiting for data."""
        seconds = time.perf_counter() - self.t_start
        stats = {
            "train/epoch_loss": float(np.mean(self.losses)),
            "train/epoch_examples_per_s": self.examples / seconds,
            "train/data_wait": self.wait / seconds,
        }
        if self.first_stage:
            stats["train/epoch_first_stage_loss"] = float(np.mean(self.first_stage))
        return stats


class Validator:
    """The dev split, scored after each epoch; rows are shared out among the workers."""

    def __init__(self, w: Worker, root: str) -> None:
        data = read_split(root, w.cfg.data.val_split, max_words=w.cfg.data.max_words)
        if w.cfg.data.val_max_images:
            data = data.head(w.cfg.data.val_max_images)
        self.data = data
        n = len(data.image_ids)
        bounds = np.linspace(0, n, w.world + 1).astype(int)
        self.rows = slice(bounds[w.rank], bounds[w.rank + 1])

    def __call__(self, w: Worker) -> dict[str, float]:
        d = self.data
        sims = score_matrix(
            w.core,
            d.features[self.rows],
            d.num_regions[self.rows],
            d.tokens,
            w.device,
            block=w.cfg.scaling.score_block,
            bf16=w.cfg.scaling.bf16,
        )
        if w.world > 1:
            parts: list[Any] = [None] * w.world
            dist.all_gather_object(parts, sims)
            sims = {k: np.concatenate([p[k] for p in parts]) for k in sims}
        return flat_metrics(split_metrics(sims, d.caption_image))


def report(w: Worker, metrics: dict[str, float]) -> None:
    """Report the epoch's ``metrics`` to Ray Train, with rank 0's checkpoint. With
    ``tracking.checkpoint_upload: async`` Ray uploads the checkpoint to the storage in a
    thread of its own while the next epoch runs, and deletes the local folder after the upload
    (so it is not ours to delete); with ``sync`` the workers wait for the upload."""
    import ray.train
    from ray.train import CheckpointUploadMode

    if w.cfg.tracking.checkpoint_upload == "sync":
        with tempfile.TemporaryDirectory() as d:
            checkpoint = save_local(w, metrics, d) if w.rank == 0 else None
            ray.train.report(
                metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.SYNC
            )
        return
    checkpoint = None
    if w.rank == 0:  # Ray deletes the folder once it is uploaded
        checkpoint = save_local(w, metrics, tempfile.mkdtemp(prefix="shan-checkpoint-"))
    ray.train.report(
        metrics,
        checkpoint=checkpoint,
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
        delete_local_checkpoint_after_upload=True,
    )


def save_local(w: Worker, metrics: dict[str, float], folder: str) -> Any:
    """Rank 0's checkpoint written to ``folder``: a ``ray.train.Checkpoint`` of it."""
    import ray.train

    saved = Checkpoint(
        weights=w.core.state_dict(),
        config=w.cfg,
        vocab=w.vocab,
        optimizer=w.optimizer.state_dict(),
        epoch=w.state.epoch,
        step=w.state.step,
        best_rsum=w.state.best_rsum,
        metrics=metrics,
    )
    save_checkpoint(folder, saved)
    return ray.train.Checkpoint.from_directory(folder)


def train_loop_per_worker(config: dict[str, LoopSettings]) -> None:
    """Entry point given to ``TorchTrainer``; its ``train_loop_config`` is
    ``{"settings": LoopSettings}`` (Ray's contract is a dict)."""
    settings = config["settings"]
    box = FatalBox(settings.mlflow_uri, settings.mlflow_run_id, settings.fit_token)
    if box.read() is not None:
        return  # a user error ended this training; the driver raises it
    try:
        run_worker(settings, box)
    except USER_ERRORS as e:  # raised outside the steps: the other ranks may be anywhere
        box.write(to_record(e))
        raise
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
        error = JobError(
            f"a training worker ran out of memory ({str(e).splitlines()[0][:200]}): lower "
            "optim.batch_size or the model's sizes (model.d, model.word_dim)"
        )
        box.write(to_record(error))  # a user error: the retried workers stop at once
        raise error from None


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation that failed: Python's, CUDA's, or torch's CPU allocator."""
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        "DefaultCPUAllocator: can't allocate memory" in str(e)
    )


def system_metrics(settings: LoopSettings) -> SystemMetrics:
    """The node's system metrics (``tracking.system_metrics_every``), sampled by its local
    rank 0 as ``system/<node address>/...``; on the other ranks, nothing."""
    import ray.train

    every = settings.config.tracking.system_metrics_every
    if ray.train.get_context().get_local_rank() != 0:
        every = 0
    return SystemMetrics(settings.mlflow_uri, settings.mlflow_run_id, every, node_address())


def run_worker(settings: LoopSettings, box: FatalBox) -> None:
    with system_metrics(settings):  # stopped when the loop ends or fails
        w = build_worker(settings)
        try:
            run_epochs(w, settings)
        except Stop as stop:  # every rank is here
            record = first_error(w, stop.error)
            if w.rank == 0:
                say(f"stopping the run: {record['type']}: {record['message']}")
                box.write(record)


def epoch_steps(w: Worker, captions: int) -> int:
    """About how many steps an epoch over ``captions`` training captions takes: one global
    batch of ``optim.batch_size`` a step, at any world size (a ConfigError when the batch
    cannot be shared out among the workers)."""
    w.cfg.optim.batch_shares(w.world)
    return captions // w.cfg.optim.batch_size


def batch_line(w: Worker) -> str:
    """``workers: 2 (elastic 1-2); batch 32 = 16 + 16``: the group and how the global batch is
    shared out, saying which ranks take one more example when it does not divide."""
    o = w.cfg.optim
    shares = o.batch_shares(w.world)
    if w.world <= 8:
        split = " + ".join(map(str, shares))
    else:  # 16 x 9 + 48 x 8
        split = " + ".join(f"{shares.count(n)} x {n}" for n in sorted(set(shares), reverse=True))
    line = f"workers: {w.cfg.scaling.describe_workers(w.world)}; batch {o.batch_size} = {split}"
    more = o.batch_size % w.world
    if more:
        ranks = "rank 0 takes" if more == 1 else f"ranks 0-{more - 1} take"
        line += f" ({o.batch_size} does not divide over {w.world} workers: {ranks} one more"
        line += " example)"
    return line


def announce_group(w: Worker) -> None:
    """On rank 0, at the start of each (re)started group: :func:`batch_line`, and the world
    size as ``train/workers`` at the step the group starts from."""
    if w.rank != 0:
        return
    say(batch_line(w))
    if w.logger is not None:
        w.logger.log({"train/workers": w.world}, step=w.state.step)


def run_epochs(w: Worker, settings: LoopSettings) -> None:
    import ray.train

    hint = epoch_steps(w, settings.train_captions)  # a ConfigError when batch < workers
    announce_group(w)
    validator = Validator(w, settings.data_root)
    shard = ray.train.get_dataset_shard("train")
    shard = faults.at_start(w.faults, shard, rank=w.rank, world=w.world, epoch=w.state.epoch)
    while w.state.epoch < w.cfg.optim.epochs:
        stats = train_epoch(w, epoch_batches(w, shard), hint).stats()
        val = validator(w)
        w.state.epoch += 1
        w.state.best_rsum = max(w.state.best_rsum, val["val/rsum"])
        metrics = {"epoch": w.state.epoch, "step": w.state.step, **stats, **val}
        if w.logger is not None:  # rank 0
            w.logger.log({k: v for k, v in metrics.items() if "/" in k}, step=w.state.epoch)
            say(
                f"epoch {w.state.epoch}/{w.cfg.optim.epochs}: loss "
                f"{stats['train/epoch_loss']:.4f}, dev rsum {val['val/rsum']:.1f} "
                f"(R@1 i2t {val['val/i2t_r1']:.1f}, t2i {val['val/t2i_r1']:.1f}), "
                f"{stats['train/epoch_examples_per_s']:.0f} examples/s per worker, data wait "
                f"{100 * stats['train/data_wait']:.0f}%"
            )
        report(w, metrics)
