"""Configs: dataclasses loaded from YAML, with ``key=value`` overrides.

A config file is a nested mapping whose top-level keys are the sections of :class:`Config`
(``model``, ``loss``, ``optim``, ``data``, ``scaling``, ``tracking``, ...). Overrides use dotted
keys (``model.d=256``, ``optim.lr=1e-4``); values are parsed as YAML scalars. Unknown keys and
values of the wrong type raise :class:`ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "jobs" / "configs"


class ConfigError(ValueError):
    """A config file or override is malformed (unknown key, wrong type, bad value)."""


@dataclass
class ModelConfig:
    """SHAN's architecture (SPEC sections 2 to 6). Fields marked (choice) in the SPEC."""

    feature_dim: int = 2048  # region feature size from the detector
    d: int = 1024  # joint embedding size
    word_dim: int = 300  # GloVe and learnable word embedding size (each)
    glove_path: str | None = None  # GloVe text file; None: a second learnable embedding
    freeze_glove: bool = True
    affinity: str = "cosine"  # (choice) "cosine" normalises projected rows; "dot" does not
    lambda_l2l: float = 9.0  # (choice) L2L softmax temperature, SCAN's value
    lambda_g2l: float = 9.0  # (choice) G2L softmax temperature
    mu: float = 0.5  # (choice) L2L weight of the image-side total
    d_a: int = 256  # self-attention pooling width
    w_l2l: float = 1.0 / 3  # (choice) step weights of the total score
    w_g2l: float = 1.0 / 3
    w_g2g: float = 1.0 / 3
    direction: str = "full"  # "full", "i2t" or "t2i" (the paper's variants)

    def validate(self) -> None:
        _one_of("model.affinity", self.affinity, ("cosine", "dot"))
        _one_of("model.direction", self.direction, ("full", "i2t", "t2i"))
        for name in ("feature_dim", "d", "word_dim", "d_a"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.mu <= 1.0:
            raise ConfigError(f"model.mu must lie in [0, 1], got {self.mu}")


@dataclass
class LossConfig:
    """Hinge triplet loss (SPEC section 7)."""

    margin: float = 0.2
    negatives: str = "hardest"  # "hardest" (VSE++) or "all" (sum over every negative)
    per_step: bool = False  # (choice) add the same loss on each step's score

    def validate(self) -> None:
        _one_of("loss.negatives", self.negatives, ("hardest", "all"))


@dataclass
class OptimConfig:
    """Adam with a step decay and gradient clipping (SPEC section 7 defaults, Flickr30K)."""

    epochs: int = 30
    batch_size: int = 128  # per worker
    lr: float = 2e-4
    lr_decay_epoch: int = 15
    lr_decay: float = 0.1
    grad_clip: float = 2.0
    warmup_steps: int = 0
    weight_decay: float = 0.0

    def validate(self) -> None:
        if self.epochs <= 0 or self.batch_size <= 1:
            raise ConfigError("optim.epochs must be >= 1 and optim.batch_size >= 2")


@dataclass
class DataConfig:
    """Where the data set is and how it is read."""

    path: str | None = None  # data set root (local or s3://); None: the generated demo set
    train_split: str = "train"
    val_split: str = "dev"
    max_words: int = 80  # longer captions are cut (after <start>, before padding)
    shuffle_buffer: int = 2048  # examples held for the per-worker shuffle
    val_max_images: int | None = None  # cap on dev images scored after each epoch


@dataclass
class ScalingConfig:
    """Ray resources. ``None`` means: size from the cluster."""

    num_workers: int | None = None
    use_gpu: bool | None = None
    cpus_per_worker: float | None = None
    gpus_per_worker: float = 1.0
    score_block: int | None = None  # pairs per block side in scoring; None: 8 CPU, 64 GPU
    checkpoint_blocks: bool = False  # recompute score blocks in backward (less memory)
    bf16: bool = True  # autocast on CUDA


@dataclass
class TrackingConfig:
    """MLflow and run naming."""

    experiment: str = "shan"
    run_name: str | None = None  # Ray Train run name; reuse one to continue that run
    storage_path: str | None = None  # Ray Train storage (local dir or s3://); None: ./runs
    log_every: int = 20  # steps between train/loss points
    keep_checkpoints: int = 2
    max_failures: int = 3  # worker-group restarts from the last checkpoint before giving up


@dataclass
class DebugConfig:
    """Test hooks. Never set in real configs."""

    kill_worker_at_step: int | None = None  # SIGKILL rank 1 (or 0) at this global step, once
    kill_marker: str | None = None  # file created before the kill, so it happens only once
    nan_at_step: int | None = None  # make the loss non-finite at this step


@dataclass
class Config:
    """Everything a training or evaluation job needs."""

    name: str = "default"
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self) -> Config:
        for section in (self.model, self.loss, self.optim):
            section.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, e.g. ``{"model.d": 1024, ...}`` (for MLflow params)."""
        return _flatten(self.to_dict())


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {value!r}")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]!s}; known keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, prefix=f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, tp)
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["model.d=64", "optim.lr=1e-3"]`` -> nested dict. Values are YAML scalars."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        value = yaml.safe_load(raw) if raw.strip() else None
        if isinstance(value, str) and _looks_numeric(raw):
            value = float(raw)
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def _looks_numeric(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def resolve_config_path(name_or_file: str) -> Path:
    """A config name (``demo``) found in ``jobs/configs/``, or a path to a YAML file."""
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path
    candidate = CONFIG_DIR / f"{name_or_file}.yaml"
    if not candidate.is_file():
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
        raise ConfigError(f"no config named {name_or_file!r}; known: {', '.join(known)}")
    return candidate


def load_config(name_or_file: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the dataclass defaults) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if name_or_file is not None:
        path = resolve_config_path(name_or_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    data = _merge(data, parse_overrides(overrides or []))
    return from_dict(Config, data).validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. from a checkpoint)."""
    return from_dict(Config, data).validate()
