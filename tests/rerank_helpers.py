"""Builders for the retrieve-then-rerank tests: a tiny checkpoint with a first-stage head, and
an index of a split built in this process by ``shan index build``'s job."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import first_stage_config, save_untrained

FIRST_STAGE_DIM = 8  # the tiny model's first-stage vectors


def save_untrained_first_stage(folder: Path, vocab, seed: int = 0) -> Path:
    """A freshly initialised tiny SHAN with a first-stage head of :data:`FIRST_STAGE_DIM`
    (:func:`tests.helpers.first_stage_config`, written beside ``folder``), saved as a checkpoint
    in ``folder``; ``seed`` gives other weights."""
    config = first_stage_config(Path(folder).parent, FIRST_STAGE_DIM)
    return save_untrained(folder, vocab, config, seed=seed)


def build_index(ckpt: Path, data: Path, dest: Path, split: str = "test", shard_size: int = 4):
    """The index of ``data``'s ``split`` for the checkpoint ``ckpt`` written to ``dest`` by
    ``shan index build``'s job in this process (no Ray), exact, in shards of ``shard_size``
    images (so a small split has several); its card."""
    from shan.indexing import IndexOptions, build_index

    opts = IndexOptions(kind="flat", shard_size=shard_size, local=True)
    return build_index(str(ckpt), str(data), split, str(dest), opts, log=lambda s: None).card
