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

import json
import math
import os
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist

from shan.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shan.config import Config
from shan.data.reader import Batch, ExampleStream, read_split
from shan.errors import BY_NAME, USER_ERRORS, JobError, to_record
from shan.loss import BatchLoss
from shan.model import SHAN
from shan.progress import quiet_ray_train_reports
from shan.scoring import autocast, score_matrix, split_metrics
from shan.tracking.names import flat_metrics
from shan.tracking.runs import FatalBox, MetricLogger
from shan.tracking.system import SystemMetrics
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


def say(line: str) -> None:
    """One line to the driver's output. Ray Train replaces ``print`` in its workers with a
    version that both prints and logs, so each printed line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


GO, DONE, FAIL = 2, 1, 0  # a rank's state at a step; the ranks agree on the minimum


class Stop(Exception):
    """Every rank leaves the loop together: some rank raised ``error`` (None on the others)."""

    def __init__(self, error: BaseException | None) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass
class Progress:
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
    progress: Progress


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
        progress=Progress(),
    )


def build_worker(settings: LoopSettings) -> Worker:
    """This Ray Train worker's :class:`Worker`, resumed from Ray's checkpoint if there is one."""
    import ray.train
    import ray.train.torch

    quiet_ray_train_reports()  # Ray Train's per-report metric dump: its log file only
    cfg = settings.config
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if cfg.debug.fail_with and cfg.debug.fail_at_step is None and rank == world - 1:
        raise BY_NAME[cfg.debug.fail_with](f"debug: {cfg.debug.fail_with} on rank {rank} at start")
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


def recorded(rows: Iterable[Any], seen: list[list[int]]) -> Iterator[Any]:
    """``rows`` as they are, appending ``[image_id, captions]`` of each image row to ``seen``."""
    for batch in rows:
        for iid, toks in zip(batch["image_id"], batch["tokens"], strict=True):
            seen.append([int(iid), len(toks)])
        yield batch


def write_rows_log(w: Worker, seen: list[list[int]]) -> None:
    """``debug.rows_log``/``epoch<E>-rank<R>.json``: the image rows (``[image_id, captions]``)
    this rank read in epoch E (1-based), and its node's address."""
    from shan.data import fs

    folder = w.cfg.debug.rows_log
    assert folder is not None
    name = f"epoch{w.progress.epoch + 1}-rank{w.rank}.json"
    record = {"rank": w.rank, "node": node_address(), "rows": seen}
    fs.write_bytes(fs.join(folder, name), json.dumps(record).encode())


def restore(w: Worker) -> None:
    """Weights, optimizer state and progress from Ray Train's latest checkpoint, if any."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return
    with ckpt.as_directory() as d:
        saved = load_checkpoint(d)
    w.core.load_state_dict(saved.weights)
    if saved.optimizer is not None:
        w.optimizer.load_state_dict(saved.optimizer)
    w.progress = Progress(saved.epoch, saved.step, saved.best_rsum)
    if w.rank == 0 and w.logger is not None:
        say(f"resumed from the checkpoint of epoch {w.progress.epoch}, step {w.progress.step}")
        w.logger.log({"train/resumed_at_epoch": w.progress.epoch}, step=w.progress.step)


def agree(w: Worker, state: int) -> int:
    """The lowest ``state`` of all ranks: FAIL if any rank failed, else DONE if any rank has
    no batch left (DDP needs equal step counts), else GO."""
    if w.world == 1:
        return state
    flag = torch.tensor([state], device=w.device)
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


def maybe_inject_failure(w: Worker) -> None:
    """Test hook: SIGKILL the last rank at ``debug.kill_worker_at_step``, once per marker file."""
    d = w.cfg.debug
    if d.kill_worker_at_step != w.progress.step or w.rank != w.world - 1 or not d.kill_marker:
        return
    marker = Path(d.kill_marker)
    if marker.exists():
        return
    marker.write_text(f"killed rank {w.rank} at step {w.progress.step}\n")
    say(f"debug: killing rank {w.rank} (pid {os.getpid()}) at step {w.progress.step}")
    os.kill(os.getpid(), signal.SIGKILL)


def maybe_inject_error(w: Worker) -> None:
    """Test hook: the last rank raises ``debug.fail_with`` at ``debug.fail_at_step``."""
    d = w.cfg.debug
    if d.fail_with and d.fail_at_step == w.progress.step and w.rank == w.world - 1:
        raise BY_NAME[d.fail_with](
            f"debug: {d.fail_with} on rank {w.rank} at step {w.progress.step}"
        )


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
    if w.cfg.debug.nan_at_step == w.progress.step and w.rank == w.world - 1:
        loss = loss * float("nan")
    return loss


def batch_loss(w: Worker, loss: torch.Tensor) -> torch.Tensor:
    """The global batch's loss (scalar, detached): the sum of every worker's ``loss``, the
    number one worker would log for the whole batch. Non-finite on every rank when any rank's
    is."""
    total = loss.detach().clone()  # ()
    if w.world > 1 and dist.is_initialized():
        dist.all_reduce(total)
    return total


def check_loss(w: Worker, loss: torch.Tensor) -> None:
    """Every rank goes on only when every rank's loss is finite (before backward, whose
    gradient all-reduce would otherwise wait for the rank that stopped)."""
    error = None
    if not torch.isfinite(loss):
        error = JobError(
            f"non-finite loss ({loss.item()}) at epoch {w.progress.epoch + 1}, "
            f"step {w.progress.step}: lower optim.lr or check the data"
        )
    if agree(w, FAIL if error else GO) == FAIL:
        raise Stop(error)


def train_step(w: Worker, batch: Batch) -> float:
    """One optimizer step on this worker's share ``batch``: loss, agreement that every rank's
    is finite, backward, clipping, Adam. Returns the global batch's loss.

    The global batch's loss is the sum of the workers' losses and DDP averages the gradients
    over the workers, so each worker backpropagates ``world`` times its loss: the averaged
    gradient is the gradient of the global batch's loss, as one worker would compute it.
    """
    loss = forward(w, batch)
    total = batch_loss(w, loss)
    check_loss(w, total)
    w.optimizer.zero_grad(set_to_none=True)
    (loss * w.world).backward()
    torch.nn.utils.clip_grad_norm_(w.core.parameters(), w.cfg.optim.grad_clip)
    w.optimizer.step()
    return total.item()


def train_epoch(w: Worker, shard: DataIterator, steps_hint: int) -> dict[str, float]:
    """One pass over this worker's data shard, ``optim.batch_size // world`` examples a step;
    returns the mean loss of the global batches, examples/s and data-wait share."""
    cfg, epoch = w.cfg, w.progress.epoch
    rows = shard.iter_batches(batch_size=64, batch_format="numpy", prefetch_batches=2)
    seen: list[list[int]] = []
    if cfg.debug.rows_log:
        rows = recorded(rows, seen)
    stream = ExampleStream(
        cfg.optim.worker_batch(w.world),
        cfg.data.shuffle_buffer,
        cfg.data.max_words,
        seed=[cfg.seed, epoch, w.rank],
    )
    batches = stream(rows)
    w.model.train()
    losses: list[float] = []
    examples, wait, t_start = 0, 0.0, time.perf_counter()
    t_log, ex_log = t_start, 0
    while True:
        t0 = time.perf_counter()
        error = None
        try:
            maybe_inject_error(w)
            batch = next(batches, None)
        except USER_ERRORS as e:  # a damaged file, ...: every rank stops with it
            error, batch = e, None
        wait += time.perf_counter() - t0
        state = agree(w, FAIL if error else GO if batch is not None else DONE)
        if state == FAIL:
            raise Stop(error)
        if state == DONE:
            break
        assert batch is not None  # this rank said GO: it has a batch
        lr = lr_at(cfg, epoch, w.progress.step)
        for group in w.optimizer.param_groups:
            group["lr"] = lr
        maybe_inject_failure(w)
        losses.append(train_step(w, batch))
        examples += len(batch)
        w.progress.step += 1
        if w.logger is not None and len(losses) % cfg.tracking.log_every == 0:  # rank 0
            now = time.perf_counter()
            rate = (examples - ex_log) / (now - t_log)
            t_log, ex_log = now, examples
            recent = float(np.mean(losses[-cfg.tracking.log_every :]))
            say(
                f"epoch {epoch + 1}/{cfg.optim.epochs} step {len(losses)}/~{steps_hint} "
                f"loss {recent:.4f} lr {lr:.2e} {rate:.0f} examples/s per worker"
            )
            w.logger.log(
                {"train/loss": recent, "train/lr": lr, "train/examples_per_s": rate},
                step=w.progress.step,
            )
    for _ in batches:  # drain what is left, so that the next epoch starts clean
        pass
    if cfg.debug.rows_log:
        write_rows_log(w, seen)
    if not losses:  # the ranks stopped at the same step, so all of them are here
        raise Stop(
            JobError(
                "this worker got no training batch: the train split is smaller than "
                "the global batch (optim.batch_size)"
            )
        )
    seconds = time.perf_counter() - t_start
    return {
        "train/epoch_loss": float(np.mean(losses)),
        "train/epoch_examples_per_s": examples / seconds,
        "train/data_wait": wait / seconds,
    }


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
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if w.rank == 0:
            state = Checkpoint(
                weights=w.core.state_dict(),
                config=w.cfg,
                vocab=w.vocab,
                optimizer=w.optimizer.state_dict(),
                epoch=w.progress.epoch,
                step=w.progress.step,
                best_rsum=w.progress.best_rsum,
                metrics=metrics,
            )
            save_checkpoint(d, state)
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def train_loop_per_worker(config: dict[str, LoopSettings]) -> None:
    """Entry point given to ``TorchTrainer``; its ``train_loop_config`` is
    ``{"settings": LoopSettings}`` (Ray's contract is a dict)."""
    settings = config["settings"]
    box = FatalBox(settings.mlflow_uri, settings.mlflow_run_id, settings.fit_token)
    if box.read() is not None:
        return  # a user error ended this training; the driver raises it
    try:
        train(settings, box)
    except USER_ERRORS as e:  # raised outside the steps: the other ranks may be anywhere
        box.write(to_record(e))
        raise


def system_metrics(settings: LoopSettings) -> SystemMetrics:
    """The node's system metrics (``tracking.system_metrics_every``), sampled by its local
    rank 0 as ``system/<node address>/...``; on the other ranks, nothing."""
    import ray.train

    every = settings.config.tracking.system_metrics_every
    if ray.train.get_context().get_local_rank() != 0:
        every = 0
    return SystemMetrics(settings.mlflow_uri, settings.mlflow_run_id, every, node_address())


def train(settings: LoopSettings, box: FatalBox) -> None:
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
    batch (``world`` shares of ``optim.batch_size // world``) a step."""
    return captions // (w.cfg.optim.worker_batch(w.world) * w.world)


def announce_batch(w: Worker) -> None:
    """Say the batch actually used when ``optim.batch_size`` does not divide over the workers."""
    o = w.cfg.optim
    per = o.worker_batch(w.world)
    if per * w.world != o.batch_size:
        say(
            f"optim.batch_size {o.batch_size} does not divide over {w.world} workers: each "
            f"takes {per} examples a step, a global batch of {per * w.world}"
        )


def run_epochs(w: Worker, settings: LoopSettings) -> None:
    import ray.train

    hint = epoch_steps(w, settings.train_captions)  # a ConfigError when batch < workers
    if w.rank == 0:
        announce_batch(w)
    validator = Validator(w, settings.data_root)
    shard = ray.train.get_dataset_shard("train")
    while w.progress.epoch < w.cfg.optim.epochs:
        stats = train_epoch(w, shard, hint)
        val = validator(w)
        w.progress.epoch += 1
        w.progress.best_rsum = max(w.progress.best_rsum, val["val/rsum"])
        metrics = {"epoch": w.progress.epoch, "step": w.progress.step, **stats, **val}
        if w.logger is not None:  # rank 0
            w.logger.log({k: v for k, v in metrics.items() if "/" in k}, step=w.progress.epoch)
            say(
                f"epoch {w.progress.epoch}/{w.cfg.optim.epochs}: loss "
                f"{stats['train/epoch_loss']:.4f}, dev rsum {val['val/rsum']:.1f} "
                f"(R@1 i2t {val['val/i2t_r1']:.1f}, t2i {val['val/t2i_r1']:.1f}), "
                f"{stats['train/epoch_examples_per_s']:.0f} examples/s per worker, data wait "
                f"{100 * stats['train/data_wait']:.0f}%"
            )
        report(w, metrics)
