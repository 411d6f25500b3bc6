"""Faults the tests inject into training, and the probe they read back; never a user setting.

They come from the environment variable ``SHAN_TEST_FAULTS``, a JSON object (unset: none)::

    SHAN_TEST_FAULTS='{"fail_with": "DataError", "fail_at_step": 5}' python jobs/train.py ...

The driver reads it (:func:`from_env`) and hands the :class:`Faults` to the workers with their
settings, so that they get it from a shared Ray head too. A worker calls two hooks:
:func:`at_start` once, and :func:`at_step` before each step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shan.data import fs
from shan.errors import BY_NAME

if TYPE_CHECKING:
    from shan.data.reader import Batch

ENV = "SHAN_TEST_FAULTS"


@dataclass(frozen=True, kw_only=True)
class Faults:
    """What to break, on the last rank; None: nothing."""

    kill_worker_at_step: int | None = None  # SIGKILL the last rank at this step, once ...
    kill_marker: str | None = None  # ... a file created before the kill: there, no kill
    nan_at_step: int | None = None  # the last rank's batch turns NaN at this step
    fail_with: str | None = None  # a user error type (shan.errors) the last rank raises ...
    fail_at_step: int | None = None  # ... at this step; None: when the worker starts
    rows_log: str | None = None  # folder: each rank writes the image rows it read each epoch

    def __post_init__(self) -> None:
        for name in ("kill_worker_at_step", "nan_at_step", "fail_at_step"):
            value = getattr(self, name)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"{ENV}: {name} must be an integer >= 0, got {value!r}")
        if self.fail_with is not None and self.fail_with not in BY_NAME:
            raise ValueError(f"{ENV}: fail_with must be one of {', '.join(BY_NAME)}")
        for name in ("kill_marker", "rows_log"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{ENV}: {name} must be a non-empty text, got {value!r}")

    @classmethod
    def parse(cls, text: str) -> Faults:
        """The faults of a JSON object; ValueError naming what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"{ENV} must hold a JSON object, got {text!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{ENV}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**data)


def env(**faults: Any) -> dict[str, str]:
    """``{SHAN_TEST_FAULTS: JSON}`` for a job's environment (the tests' side)."""
    Faults(**faults)  # checked here, where the test is
    return {ENV: json.dumps(faults)}


def from_env() -> Faults | None:
    """The faults ``SHAN_TEST_FAULTS`` asks for; None when it is unset or empty."""
    text = os.environ.get(ENV)
    return Faults.parse(text) if text else None


def at_start(faults: Faults | None, shard: Any, *, rank: int, world: int, epoch: int) -> Any:
    """When a worker starts, before its first epoch (``epoch`` epochs done): the last rank
    raises ``fail_with`` if ``fail_at_step`` is None. Returns ``shard`` (the worker's
    ``DataIterator``), which writes the rows log when ``rows_log`` asks for it."""
    if faults is None:
        return shard
    if faults.fail_with and faults.fail_at_step is None and rank == world - 1:
        raise BY_NAME[faults.fail_with](f"debug: {faults.fail_with} on rank {rank} at start")
    if faults.rows_log:
        return RowsLog(shard, faults.rows_log, rank=rank, epoch=epoch)
    return shard


def at_step(faults: Faults | None, step: int, rank: int, world: int, batch: Batch | None) -> Any:
    """Before optimizer step ``step``, with this rank's ``batch`` (None: it has none left):
    the last rank is killed, raises ``fail_with`` or gets a NaN batch, as ``faults`` asks.
    Returns the batch to train on."""
    if faults is None or rank != world - 1:
        return batch
    if faults.kill_worker_at_step == step and faults.kill_marker:
        marker = Path(faults.kill_marker)
        if not marker.exists():
            marker.write_text(f"killed rank {rank} at step {step}\n")
            sys.stdout.write(f"debug: killing rank {rank} (pid {os.getpid()}) at step {step}\n")
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    if faults.fail_with and faults.fail_at_step == step:
        raise BY_NAME[faults.fail_with](f"debug: {faults.fail_with} on rank {rank} at step {step}")
    if faults.nan_at_step == step and batch is not None:
        return dataclasses.replace(batch, features=batch.features * float("nan"))
    return batch


class RowsLog:
    """A worker's data shard that writes ``<folder>/epoch<E>-rank<R>.json`` after each full
    pass over it: the image rows (``[image_id, captions]``) this rank read in epoch E
    (1-based), and its node's address. ``epoch``: the epochs done before the first pass."""

    def __init__(self, shard: Any, folder: str, *, rank: int, epoch: int) -> None:
        self.shard, self.folder, self.rank, self.epoch = shard, folder, rank, epoch

    def iter_batches(self, **kw: Any) -> Iterator[Any]:
        self.epoch += 1
        return self._recorded(self.shard.iter_batches(**kw), self.epoch)

    def _recorded(self, rows: Any, epoch: int) -> Iterator[Any]:
        import ray.util

        seen: list[list[int]] = []
        for batch in rows:
            for iid, toks in zip(batch["image_id"], batch["tokens"], strict=True):
                seen.append([int(iid), len(toks)])
            yield batch
        record = {"rank": self.rank, "node": ray.util.get_node_ip_address(), "rows": seen}
        name = f"epoch{epoch}-rank{self.rank}.json"
        fs.write_bytes(fs.join(self.folder, name), json.dumps(record).encode())
