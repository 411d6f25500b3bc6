"""Checkpoints: a folder with ``model.pt`` (weights, optimizer, progress), ``config.yaml`` and
``vocab.json``: everything needed to resume training or to score.

Two loaders: :func:`load_checkpoint` (training: everything, the optimizer's state included) and
:func:`load_model` (scoring: weights only, the model built, checked and in eval mode);
:func:`load_checked` is the scoring loader checked against a data set (evaluation, search).
Loading checks everything a damaged or crafted checkpoint could get wrong, and says which file:
``model.pt`` is read with ``torch.load(weights_only=True)`` (a pickle that would run code is
refused), must be a dict with a ``"model"`` state dict that fits the model its ``config.yaml``
builds, and every weight must be finite.
"""

from __future__ import annotations

import dataclasses
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from shan.config import Config, ConfigError, bounded_yaml, config_from_dict
from shan.data.fs import out_of_space, write_error
from shan.errors import CheckpointError
from shan.fingerprint import file_digests
from shan.vocab import VocabError, Vocabulary

if TYPE_CHECKING:  # torch is imported where it is used: the error paths of the jobs stay light
    import torch

    from shan.data.format import DatasetCard
    from shan.model import SHAN

MODEL_FILE, CONFIG_FILE, VOCAB_FILE = "model.pt", "config.yaml", "vocab.json"
FILES = (MODEL_FILE, CONFIG_FILE, VOCAB_FILE)


@dataclass
class Checkpoint:
    """What a checkpoint holds: the weights, what built them, and where training stood."""

    weights: dict[str, torch.Tensor]  # the model's state dict
    config: Config
    vocab: Vocabulary
    optimizer: dict[str, Any] | None = None  # Adam's state; None in a weights-only copy
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_rsum: float = -math.inf
    metrics: dict[str, float] = field(default_factory=dict)

    def weights_only(self) -> Checkpoint:
        """This checkpoint without the optimizer's state (what scoring needs)."""
        return dataclasses.replace(self, optimizer=None)


@dataclass
class LoadedModel:
    """A checkpoint ready to score: its model (built, checked, in eval mode) and the weights-only
    :class:`Checkpoint` it came from (config, vocabulary; what evaluation actors receive)."""

    model: SHAN
    checkpoint: Checkpoint  # weights only

    @property
    def config(self) -> Config:
        return self.checkpoint.config

    @property
    def vocab(self) -> Vocabulary:
        return self.checkpoint.vocab


def save_checkpoint(folder: str | Path, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` into ``folder`` (created): model.pt, config.yaml, vocab.json. A full
    disk is a StorageError naming the folder (a user error: retrying would not help)."""
    try:
        return _save(Path(folder), ckpt)
    except OSError as e:
        if out_of_space(e):
            raise write_error(e, f"the checkpoint {folder}") from None
        raise


def _save(folder: Path, ckpt: Checkpoint) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {
        "model": ckpt.weights,
        "epoch": ckpt.epoch,
        "step": ckpt.step,
        "best_rsum": ckpt.best_rsum,
        "metrics": ckpt.metrics,
    }
    if ckpt.optimizer is not None:
        payload["optimizer"] = ckpt.optimizer
    import torch

    buf = io.BytesIO()  # torch.save to a file hides a full disk in a RuntimeError
    torch.save(payload, buf)
    (folder / MODEL_FILE).write_bytes(buf.getbuffer())
    (folder / CONFIG_FILE).write_text(yaml.safe_dump(ckpt.config.to_dict(), sort_keys=False))
    ckpt.vocab.save(folder / VOCAB_FILE)
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
        text = path.read_bytes().decode("utf-8")
        cfg = config_from_dict(bounded_yaml(text, str(path)))  # anyone's file: bounded
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


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Everything ``folder`` holds (to resume training); CheckpointError names what is wrong."""
    folder = Path(folder)
    cfg, vocab = load_description(folder)
    path = folder / MODEL_FILE
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged or crafted file
        raise CheckpointError(f"{path}: cannot be loaded as weights ({_short(e)})") from e
    if not isinstance(payload, dict) or not isinstance(payload.get("model"), dict):
        what = "a dict without 'model'" if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{path}: not a SHAN checkpoint (expected a dict with a 'model' state dict, got {what})"
        )
    return Checkpoint(
        weights=payload["model"],
        config=cfg,
        vocab=vocab,
        optimizer=payload.get("optimizer"),
        epoch=int(payload.get("epoch", 0)),
        step=int(payload.get("step", 0)),
        best_rsum=float(payload.get("best_rsum", -math.inf)),
        metrics=dict(payload.get("metrics") or {}),
    )


def check_weights(state: dict[str, Any], where: str) -> None:
    """Every entry a tensor, every floating-point weight finite."""
    import torch

    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{where}: weight {name!r} is not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{where}: weight {name!r} holds NaN or infinite values")


def model_from_checkpoint(
    ckpt: Checkpoint, device: str | torch.device = "cpu", where: str = ""
) -> SHAN:
    """The model of ``ckpt`` with its weights, in eval mode on ``device``; CheckpointError
    (naming ``where``, the checkpoint folder) when the weights do not fit or are not finite."""
    from shan.model import SHAN

    cfg = dataclasses.replace(ckpt.config.model, glove_path=None)  # GloVe rows are in the weights
    where = where or "checkpoint"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = SHAN(cfg, len(ckpt.vocab))
    except Exception as e:  # a config that validates yet cannot build a model
        raise CheckpointError(f"{where}/{CONFIG_FILE}: cannot build the model ({_short(e)})") from e
    check_weights(ckpt.weights, f"{where}/{MODEL_FILE}")
    try:
        model.load_state_dict(ckpt.weights)
    except (RuntimeError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise CheckpointError(
            f"{where}/{MODEL_FILE}: the weights do not match {CONFIG_FILE} ({_short(e)})"
        ) from e
    return model.to(device).eval()


def require_first_stage(model: SHAN, name: str) -> None:
    """CheckpointError naming the model (``name``, as the user gave it) when it has no
    first-stage head (a checkpoint trained with ``model.first_stage_dim`` 0, or before there
    was one): an index and a rerank need one."""
    if model.first_stage is None:
        raise CheckpointError(
            f"model {name} has no first-stage head (its model.first_stage_dim is 0), so it "
            "cannot build or use an index: fit one with `shan index head --model ... --out "
            "NEW_CHECKPOINT`, or search and evaluate it without --index/--rerank"
        )


def load_model(folder: str | Path, device: str | torch.device = "cpu") -> LoadedModel:
    """The checkpoint in ``folder`` ready to score (weights only: the optimizer's state is
    dropped); CheckpointError (naming the file) when anything is wrong."""
    ckpt = load_checkpoint(folder).weights_only()
    model = model_from_checkpoint(ckpt, device, where=str(Path(folder)))
    return LoadedModel(model, ckpt)


@dataclass
class CheckedModel(LoadedModel):
    """A :class:`LoadedModel` checked against a data set, with its files' sha256 digests."""

    files: dict[str, str]  # file name -> sha256 of its bytes (for fingerprints)


def load_checked(
    folder: str | Path, card: DatasetCard, vocab: Vocabulary, *, name: str, data: str
) -> CheckedModel:
    """The checkpoint in ``folder`` loaded in full (:func:`load_model`: weights only, state dict
    against its config, finite weights), checked to fit the data set ``data`` (its ``card`` and
    ``vocab``); CheckpointError naming the model (``name``, as the user gave it) otherwise."""
    loaded = load_model(folder)
    cfg, ck_vocab = loaded.checkpoint.config, loaded.checkpoint.vocab
    if ck_vocab != vocab:
        raise CheckpointError(
            f"model {name}: its vocabulary ({len(ck_vocab)} words) is not the data set's "
            f"({data}, {len(vocab)} words)"
        )
    if cfg.model.feature_dim != card.feature_dim:
        raise CheckpointError(
            f"model {name}: it takes {cfg.model.feature_dim}-d features, the data set "
            f"{data} has {card.feature_dim}-d"
        )
    return CheckedModel(loaded.model, loaded.checkpoint, file_digests(folder))
