"""Checkpoints: a folder with ``model.pt`` (weights, optimizer, progress), ``config.yaml`` and
``vocab.json``: everything needed to resume training or to evaluate.

Loading checks everything a damaged or crafted checkpoint could get wrong, and says which file:
``model.pt`` is read with ``torch.load(weights_only=True)`` (a pickle that would run code is
refused), must be a dict with a ``"model"`` state dict that fits the model its ``config.yaml``
builds, and every weight must be finite.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from shan.config import Config, ConfigError, config_from_dict
from shan.errors import CheckpointError
from shan.model import SHAN
from shan.vocab import VocabError, Vocabulary

MODEL_FILE, CONFIG_FILE, VOCAB_FILE = "model.pt", "config.yaml", "vocab.json"
FILES = (MODEL_FILE, CONFIG_FILE, VOCAB_FILE)


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


def _short(e: BaseException, limit: int = 200) -> str:
    """An exception on one short line (torch and yaml messages span several)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_description(folder: str | Path) -> tuple[Config, Vocabulary]:
    """(config, vocabulary) of a checkpoint, without loading its weights; CheckpointError names
    what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    for name in FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"checkpoint {folder} has no {name}")
    path = folder / CONFIG_FILE
    try:
        cfg = config_from_dict(yaml.safe_load(path.read_bytes().decode("utf-8")))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({_short(e)})") from e
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML ({_short(e)})") from e
    except ConfigError as e:
        raise CheckpointError(f"{path}: not a valid config ({_short(e)})") from e
    path = folder / VOCAB_FILE
    try:
        vocab = Vocabulary.load(path)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({_short(e)})") from e
    except VocabError as e:
        raise CheckpointError(_short(e, 300)) from e
    return cfg, vocab


def load_checkpoint(folder: str | Path) -> tuple[dict, Config, Vocabulary]:
    """(payload of model.pt, config, vocabulary); CheckpointError names what is wrong."""
    folder = Path(folder)
    cfg, vocab = load_description(folder)
    path = folder / MODEL_FILE
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or crafted file
        raise CheckpointError(f"{path}: cannot be loaded as weights ({_short(e)})") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        what = "a dict without 'model'" if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path}: not a SHAN checkpoint (expected a dict with a 'model' state dict, got {what})"
        )
    return payload, cfg, vocab


def check_weights(state: dict, where: str) -> None:
    """Every entry a tensor, every floating-point weight finite."""
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: weight {name!r} is not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: weight {name!r} holds NaN or infinite values")


def load_model(folder: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, config, vocabulary, payload); CheckpointError (naming
    the file) when the weights are damaged, do not fit the config, or are not finite."""
    folder = Path(folder)
    payload, cfg, vocab = load_checkpoint(folder)
    cfg.model.glove_path = None  # the GloVe rows are in the weights
    where = str(folder / MODEL_FILE)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = SHAN(cfg.model, len(vocab))
    except Exception as e:  # a config that validates yet cannot build a model
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: cannot build the model ({_short(e)})"
        ) from e
    state = payload["model"]
    check_weights(state, where)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{where}: the weights do not match {CONFIG_FILE} ({_short(e)})"
        ) from e
    return model.to(device).eval(), cfg, vocab, payload
