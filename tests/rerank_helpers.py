"""Builders for the retrieve-then-rerank tests: a tiny checkpoint with a first-stage head, and
an index of a split built in this process with the index library (:mod:`shan.index`), as
``shan index build`` writes it."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from tests.helpers import TINY

FIRST_STAGE_DIM = 8  # the tiny model's first-stage vectors


def save_untrained_first_stage(folder: Path, vocab, seed: int = 0) -> Path:
    """A freshly initialised tiny SHAN (tests/configs/tiny.yaml) with a first-stage head of
    :data:`FIRST_STAGE_DIM`, saved as a checkpoint in ``folder``."""
    from shan.checkpoint import Checkpoint, save_checkpoint
    from shan.config import load_config
    from shan.model import SHAN

    cfg = load_config(TINY, [f"model.first_stage_dim={FIRST_STAGE_DIM}"])
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(cfg.model, len(vocab))
    return save_checkpoint(folder, Checkpoint(weights=model.state_dict(), config=cfg, vocab=vocab))


def build_index(ckpt: Path, data: Path, dest: Path, split: str = "test", shard_size: int = 4):
    """The index of ``data``'s ``split`` for the checkpoint ``ckpt`` written to ``dest`` (shards
    of ``shard_size`` images, so a small split has several); its card."""
    from shan.checkpoint import load_model
    from shan.data import fs
    from shan.data.format import CARD, load_card
    from shan.data.reader import read_split
    from shan.fingerprint import data_fingerprint, file_digests
    from shan.index import IndexWriter
    from shan.scoring import image_chunks

    loaded = load_model(ckpt)
    card = load_card(str(data))
    rows = read_split(str(data), split, card, max_words=loaded.config.data.max_words)
    fp = data_fingerprint(fs.read_bytes(fs.join(str(data), CARD)), rows)
    device = torch.device("cpu")
    with IndexWriter(str(dest), shard_size=shard_size, log=lambda s: None) as w:
        chunks = image_chunks(loaded.model, rows.features, rows.num_regions, device, chunk=5)
        for part, images in chunks:
            with torch.no_grad():
                vectors = loaded.model.image_vectors(images).numpy()
            counts = images.mask.sum(1).numpy().astype(np.int64)
            w.add(rows.image_ids[part], vectors, images.v.numpy(), counts)
        return w.commit(model=str(ckpt), model_files=file_digests(ckpt), data=str(data),
                        data_fingerprint=fp, split=split, kind="flat")  # fmt: skip
