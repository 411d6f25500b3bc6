"""Checkpoints: a folder with ``model.pt`` (weights, optimizer, progress), ``config.yaml`` and
``vocab.json``: everything needed to resume training or to evaluate."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from shan.config import Config, ConfigError, config_from_dict
from shan.errors import CheckpointError
from shan.model import SHAN
from shan.vocab import Vocabulary

MODEL_FILE, CONFIG_FILE, VOCAB_FILE = "model.pt", "config.yaml", "vocab.json"


def save_checkpoint(
    folder: str | Path, model: SHAN, cfg: Config, vocab: Vocabulary, **state: Any
) -> Path:
    """Write the checkpoint; ``state`` holds optimizer state, epoch, step, metrics..."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), **state}, folder / MODEL_FILE)
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    vocab.save(folder / VOCAB_FILE)
    return folder


def load_description(folder: str | Path) -> tuple[Config, Vocabulary]:
    """(config, vocabulary) of a checkpoint, without loading its weights; CheckpointError names
    what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE):
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} has no {name}")
    try:
        cfg = config_from_dict(yaml.safe_load((folder / CONFIG_FILE).read_text()))
    except (ConfigError, yaml.YAMLError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: {e}") from e
    return cfg, Vocabulary.load(folder / VOCAB_FILE)


def load_checkpoint(folder: str | Path) -> tuple[dict, Config, Vocabulary]:
    """(payload of model.pt, config, vocabulary); CheckpointError names what is wrong."""
    folder = Path(folder)
    cfg, vocab = load_description(folder)
    try:
        payload = torch.load(folder / MODEL_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise CheckpointError(f"{folder / MODEL_FILE}: cannot be loaded ({e})") from e
    return payload, cfg, vocab


def load_model(folder: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, config, vocabulary, payload)."""
    payload, cfg, vocab = load_checkpoint(folder)
    cfg.model.glove_path = None  # the GloVe rows are in the weights
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(cfg.model, len(vocab))
    try:
        model.load_state_dict(payload["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{folder}: weights do not match its config ({e})") from e
    return model.to(device).eval(), cfg, vocab, payload
