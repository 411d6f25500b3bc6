"""Configs: dataclasses loaded from YAML, with ``key=value`` overrides.

A config file is a nested mapping whose top-level keys are the sections of :class:`Config`
(``model``, ``loss``, ``optim``, ``data``, ``scaling``, ``tracking``, ...). Overrides use dotted
keys (``model.d=256``, ``optim.lr=1e-4``); values are parsed as YAML scalars, except for text
fields, which take the text as written (``data.train_split=2014`` is the split ``"2014"``).

Every value is checked in one place before any work starts: each section has one
``problems()`` function that lists what is wrong with it (type, range, allowed set), and
:meth:`Config.validate` raises one :class:`ConfigError` holding every problem of every section,
one line each, naming the dotted key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import yaml

from shan.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: demo, f30k, coco

NAME_MAX = 100
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
NAME_RULE = (
    f"a name of letters, digits, '.', '_' and '-' (not starting with '.' or '-', no '..', "
    f"at most {NAME_MAX} characters)"
)


# enumerations: the one tuple of allowed values that problems() checks and --help lists
AFFINITIES = ("cosine", "dot")
DIRECTIONS = ("full", "i2t", "t2i")
NEGATIVES = ("hardest", "all")
NEGATIVES_FROM = ("global", "local")
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
CHECKPOINT_UPLOADS = ("async", "sync")


def _key(default: Any, help: str, choices: tuple[Any, ...] = ()) -> Any:
    """A config field: its default, its meaning (``help``, shown by ``--help``) and, for an
    enumeration, its allowed values (the tuple that the section's ``problems()`` checks)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def name_problem(value: Any) -> str | None:
    """Why ``value`` is not a valid run (or config, split) name, or None when it is one.

    A name is a name, not a path: it becomes a folder under ``checkpoints/`` and the Ray Train
    storage, so ``/``, ``..`` and a leading ``.`` or ``-`` are refused."""
    if not isinstance(value, str):
        return f"must be {NAME_RULE}, got {_show(value)}"
    if len(value) > NAME_MAX or ".." in value or not _NAME.fullmatch(value):
        return f"must be {NAME_RULE}, got {_show(value)}"
    return None


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:100] + "..." + text[-10:]


class Problems(list):
    """The problems of a config section or of a job's options, one line each; each check
    appends ``PREFIX+NAME must be RULE, got VALUE`` (the prefix: ``model.``, ``--``, or none)."""

    def __init__(self, prefix: str = "") -> None:
        super().__init__()
        self.prefix = prefix

    def bad(self, name: str, value: Any, rule: str) -> None:
        self.append(f"{self.prefix}{name} must be {rule}, got {_show(value)}")

    def at_least(self, name: str, value: int | None, low: int, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            self.bad(name, value, f"an integer >= {low}" + (" or null" if optional else ""))

    def at_most(self, name: str, value: int | None, high: int) -> None:
        if isinstance(value, int) and value > high:
            self.bad(name, value, f"an integer <= {high}")

    def positive(self, name: str, value: float | None, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not _finite(value) or value <= 0:
            self.bad(name, value, "> 0 and finite" + (" (or null)" if optional else ""))

    def non_negative(self, name: str, value: float) -> None:
        if not _finite(value) or value < 0:
            self.bad(name, value, ">= 0 and finite")

    def within(self, name: str, value: float, low: float, high: float, rule: str = "") -> None:
        if not _finite(value) or not low <= value <= high:
            self.bad(name, value, rule or f"in [{low:g}, {high:g}]")

    def one_of(self, name: str, value: Any, allowed: tuple, optional: bool = False) -> None:
        if value is None and optional:
            return
        if value not in allowed:
            choices = ", ".join(map(str, allowed)) + (" or null" if optional else "")
            self.bad(name, value, f"one of {choices}")

    def text(self, name: str, value: str | None, optional: bool = False) -> None:
        if value is None and optional:
            return
        if not isinstance(value, str) or not value.strip():
            self.bad(name, value, "a non-empty text" + (" or null" if optional else ""))

    def named(self, name: str, value: str | None, optional: bool = False) -> None:
        if value is None and optional:
            return
        why = name_problem(value)
        if why:
            self.append(f"{self.prefix}{name} {why}")


class Checked:
    """Settings checked in one place, all at once: ``problems()`` lists what is wrong, one line
    each; ``check()`` raises one ConfigError holding every problem (a job prints one ``error:``
    line each). The config's sections and the evaluation's, search's and extraction's options
    are checked this way."""

    def problems(self) -> list[str]:
        raise NotImplementedError

    def check(self) -> None:
        problems = self.problems()
        if problems:
            raise ConfigError(*problems)


class _Section(Checked):
    """A config section: ``problems()`` lists what is wrong, ``validate()`` raises them."""

    def validate(self) -> None:
        """Raise one ConfigError listing every problem of this section (e.g. when a model is
        built from a ModelConfig made in code)."""
        self.check()


def _whole(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# Upper bounds of the model's sizes, generous for real use, checked before any work starts; and
# of the parameters they make together (word embeddings aside: they depend on the vocabulary).
MODEL_SIZE_MAX = {"feature_dim": 16384, "d": 16384, "word_dim": 4096, "d_a": 16384}
FIRST_STAGE_POOLS = ("max", "attention")  # shan.model.FirstStage's pool
FIRST_STAGE_DIM_MAX = 4096  # a first-stage vector's size (its index holds N of them)
MODEL_PARAMETERS_MAX = 2_000_000_000  # 8 GB of float32 weights; Adam trains with about 4 times


def model_parameters(feature_dim: int, d: int, word_dim: int, d_a: int) -> int:
    """SHAN's parameter count without the word embeddings (shan.model.SHAN): the image layer,
    the bidirectional GRU, the L2L projections, the G2L gates and the two attention pools."""
    gru = 2 * 3 * (d * 2 * word_dim + d * d + 2 * d)
    return (feature_dim + 1) * d + gru + 2 * d * d + 2 * (2 * d * d + d) + 2 * (d + 2) * d_a


@dataclass
class ModelConfig(_Section):
    """SHAN's architecture (docs/model.md §2–§6). Fields marked (choice): docs/model.md §11."""

    feature_dim: int = _key(2048, "region feature size from the detector")
    d: int = _key(1024, "joint embedding size")
    word_dim: int = _key(300, "GloVe and learnable word embedding size (each)")
    glove_path: str | None = _key(None, "GloVe text file; null: a second learnable embedding")
    freeze_glove: bool = _key(True, "keep the GloVe rows fixed (false: fine-tune them)")
    affinity: str = _key(
        "cosine", '(choice) "cosine" normalises projected rows; "dot" does not', AFFINITIES
    )
    lambda_l2l: float = _key(9.0, "(choice) L2L softmax temperature, SCAN's value")
    lambda_g2l: float = _key(9.0, "(choice) G2L softmax temperature")
    mu: float = _key(0.5, "(choice) L2L weight of the image-side total, in [0, 1]")
    d_a: int = _key(256, "self-attention pooling width")
    w_l2l: float = _key(1.0 / 3, "(choice) L2L step weight of the total score")
    w_g2l: float = _key(1.0 / 3, "(choice) G2L step weight of the total score")
    w_g2g: float = _key(1.0 / 3, "(choice) G2G step weight of the total score")
    direction: str = _key("full", "both directions, or one (the paper's variants)", DIRECTIONS)
    first_stage_dim: int = _key(
        0, "first-stage vector size (retrieve-then-rerank, shan index); 0: no first stage"
    )
    first_stage_pool: str = _key(
        "max",
        '(choice) first stage: "max" of projected fragments; "attention": attention pool, then '
        "projected (checkpoints from before the choice)",
        FIRST_STAGE_POOLS,
    )

    def problems(self, prefix: str = "model.") -> list[str]:
        p = Problems(prefix)
        for name, most in MODEL_SIZE_MAX.items():
            p.at_least(name, getattr(self, name), 1)
            p.at_most(name, getattr(self, name), most)
        sizes = [getattr(self, name) for name in MODEL_SIZE_MAX]
        if not p and all(isinstance(v, int) for v in sizes):
            n = model_parameters(*sizes)
            if n > MODEL_PARAMETERS_MAX:
                p.append(
                    f"{prefix}feature_dim, d, word_dim and d_a make {n:,} parameters "
                    f"({4 * n / 1e9:.1f} GB of float32 weights), over the limit of "
                    f"{MODEL_PARAMETERS_MAX:,}: lower {prefix}d"
                )
        p.text("glove_path", self.glove_path, optional=True)
        p.one_of("affinity", self.affinity, AFFINITIES)
        p.positive("lambda_l2l", self.lambda_l2l)
        p.positive("lambda_g2l", self.lambda_g2l)
        p.within("mu", self.mu, 0.0, 1.0)
        weights = ("w_l2l", "w_g2l", "w_g2g")
        for name in weights:
            p.non_negative(name, getattr(self, name))
        values = [getattr(self, n) for n in weights]
        if all(_finite(v) and v >= 0 for v in values) and sum(values) <= 0:
            p.append(
                f"{prefix}w_l2l, {prefix}w_g2l and {prefix}w_g2g must not all be 0, "
                f"got {values[0]}, {values[1]}, {values[2]}"
            )
        p.one_of("direction", self.direction, DIRECTIONS)
        p.at_least("first_stage_dim", self.first_stage_dim, 0)
        p.at_most("first_stage_dim", self.first_stage_dim, FIRST_STAGE_DIM_MAX)
        p.one_of("first_stage_pool", self.first_stage_pool, FIRST_STAGE_POOLS)
        return list(p)


@dataclass
class LossConfig(_Section):
    """Hinge triplet loss (docs/model.md §7)."""

    margin: float = _key(0.2, "hinge margin")
    negatives: str = _key(
        "hardest", '"hardest" (VSE++) or "all" (sum over every negative)', NEGATIVES
    )
    per_step: bool = _key(False, "(choice) add the same loss on each step's score")
    negatives_from: str = _key(
        "global", "with DDP: the whole global batch, or each worker's share", NEGATIVES_FROM
    )
    first_stage_temperature: float = _key(
        0.05, "softmax temperature of the first stage's contrastive loss (model.first_stage_dim)"
    )

    def problems(self, prefix: str = "loss.") -> list[str]:
        p = Problems(prefix)
        p.non_negative("margin", self.margin)
        p.one_of("negatives", self.negatives, NEGATIVES)
        p.one_of("negatives_from", self.negatives_from, NEGATIVES_FROM)
        p.positive("first_stage_temperature", self.first_stage_temperature)
        return list(p)


@dataclass
class OptimConfig(_Section):
    """Adam with a step decay and gradient clipping (docs/model.md §7 defaults, Flickr30K)."""

    epochs: int = _key(30, "training epochs")
    batch_size: int = _key(128, "the global batch, shared out among the workers")
    lr: float = _key(2e-4, "Adam's learning rate")
    lr_decay_epoch: int = _key(15, "the epoch from which the rate is multiplied by lr_decay")
    lr_decay: float = _key(0.1, "the step decay's factor, in (0, 1]")
    grad_clip: float = _key(2.0, "gradient norm clipped to this")
    warmup_steps: int = _key(0, "steps of linear warm-up of the rate; 0: none")
    weight_decay: float = _key(0.0, "Adam's weight decay")

    def problems(self, prefix: str = "optim.") -> list[str]:
        p = Problems(prefix)
        p.at_least("epochs", self.epochs, 1)
        p.at_least("batch_size", self.batch_size, 2)  # the triplet loss needs a negative
        p.positive("lr", self.lr)
        p.at_least("lr_decay_epoch", self.lr_decay_epoch, 0)
        if not _finite(self.lr_decay) or not 0 < self.lr_decay <= 1:
            p.bad("lr_decay", self.lr_decay, "in (0, 1] (a factor that lowers the rate)")
        p.positive("grad_clip", self.grad_clip)  # <= 0 would zero or flip the gradient
        p.at_least("warmup_steps", self.warmup_steps, 0)
        p.non_negative("weight_decay", self.weight_decay)
        return list(p)

    def worker_batch(self, workers: int, rank: int = 0) -> int:
        """Examples worker ``rank`` of ``workers`` takes per step (:meth:`batch_shares`); a
        ConfigError when a share would be 0."""
        return self.batch_shares(workers)[rank]

    def batch_shares(self, workers: int) -> list[int]:
        """The global batch shared out among ``workers``, rank by rank: ``batch_size //
        workers`` each, and one more for the first ``batch_size % workers`` ranks, so that the
        shares sum to ``batch_size`` at any world size; a ConfigError when a share would be 0."""
        problem = self.share_problem(workers)
        if problem:
            raise ConfigError(problem)
        each, more = divmod(self.batch_size, workers)
        return [each + (rank < more) for rank in range(workers)]

    def share_problem(self, workers: int) -> str | None:
        """Why the global batch cannot be shared out among ``workers`` (None: it can)."""
        if self.batch_size >= workers:
            return None
        return (
            f"optim.batch_size ({self.batch_size}) is the global batch, shared out among the "
            f"workers: it must be at least the number of workers ({workers})"
        )


@dataclass
class DataConfig(_Section):
    """Where the data set is and how it is read."""

    path: str | None = _key(
        None, "data set root (local or s3://; --data); null: the generated demo set"
    )
    train_split: str = _key("train", "the split trained on")
    val_split: str = _key("dev", "the split scored after each epoch")
    max_words: int = _key(80, "longer captions are cut (after <start>, before padding)")
    shuffle_buffer: int = _key(2048, "examples held for the per-worker shuffle")
    val_max_images: int | None = _key(None, "cap on dev images scored after each epoch; null: all")

    def problems(self, prefix: str = "data.") -> list[str]:
        p = Problems(prefix)
        p.text("path", self.path, optional=True)
        p.named("train_split", self.train_split)
        p.named("val_split", self.val_split)
        from shan.vocab import MAX_WORDS  # the data format's limit

        p.at_least("max_words", self.max_words, 1)
        p.at_most("max_words", self.max_words, MAX_WORDS)
        p.at_least("shuffle_buffer", self.shuffle_buffer, 0)
        p.at_least("val_max_images", self.val_max_images, 1, optional=True)
        return list(p)


@dataclass
class ScalingConfig(_Section):
    """Ray resources. On a cluster (``RAY_ADDRESS`` set) the workers are asked for as given,
    ``None`` taking Ray's defaults (1 worker, no GPU, 1 CPU), and the job waits up to
    ``wait_timeout`` seconds for the autoscaler; locally ``None`` means: size from the machine."""

    num_workers: int | list[int] | None = _key(
        None,
        "training workers (--workers N), or [min, max] for an elastic group that starts with "
        "what fits, goes on without a lost node and grows as nodes join (--workers MIN-MAX); "
        "null: see above",
    )
    use_gpu: bool | None = _key(None, "train on GPUs; null: see above")
    cpus_per_worker: float | None = _key(None, "CPUs per worker; null: see above")
    gpus_per_worker: float = _key(1.0, "GPUs per worker when use_gpu: <= 1, or a whole number")
    wait_timeout: float = _key(1800.0, "seconds a job on a cluster waits for its workers")
    placement_strategy: str = _key(
        "PACK",
        "Ray's placement of the workers (SPREAD: one a node if it can)",
        PLACEMENT_STRATEGIES,
    )
    score_block: int | None = _key(
        None, "pairs per block side in scoring; null: 8 on CPU, 64 on GPU"
    )
    checkpoint_blocks: bool = _key(False, "recompute score blocks in backward (less memory)")
    bf16: bool = _key(True, "bfloat16 autocast on CUDA")
    resize_interval: float = _key(
        60.0, "with num_workers [min, max]: seconds between checks for room to grow the group"
    )
    start_timeout: float = _key(
        60.0,
        "seconds a worker group may take to start before Ray Train retries it (an elastic "
        "group that lost a node first tries its old size this long, then goes on with what fits)",
    )

    def problems(self, prefix: str = "scaling.") -> list[str]:
        p = Problems(prefix)
        if isinstance(self.num_workers, list):
            p += _range_problems(f"{prefix}num_workers", self.num_workers)
        else:
            p.at_least("num_workers", self.num_workers, 1, optional=True)
        p.positive("cpus_per_worker", self.cpus_per_worker, optional=True)
        g = self.gpus_per_worker
        if not _finite(g) or g <= 0 or (g > 1 and g != int(g)):
            p.bad("gpus_per_worker", g, "> 0: a fraction of at most 1 or a whole number")
        p.positive("wait_timeout", self.wait_timeout)
        p.one_of("placement_strategy", self.placement_strategy, PLACEMENT_STRATEGIES)
        p.at_least("score_block", self.score_block, 1, optional=True)
        p.positive("resize_interval", self.resize_interval)
        p.positive("start_timeout", self.start_timeout)
        return list(p)

    @property
    def elastic(self) -> bool:
        """Whether ``num_workers`` is a range ``[min, max]`` (an elastic group)."""
        return isinstance(self.num_workers, list)

    def worker_range(self) -> tuple[int, int] | None:
        """``(min, max)`` workers: the range, ``(n, n)`` for a fixed ``n``, None when unset."""
        n = self.num_workers
        if n is None:
            return None
        if isinstance(n, list):
            return n[0], n[1]
        return n, n

    def describe_workers(self, world: int) -> str:
        """``2 (elastic 1-2)`` or ``2``: a group of ``world`` workers under this config."""
        r = self.worker_range()
        return f"{world} (elastic {r[0]}-{r[1]})" if self.elastic and r else str(world)


def _range_problems(key: str, value: list[Any]) -> list[str]:
    """What is wrong with a ``[min, max]`` range of workers, one line each."""
    shown = _show(value)
    if len(value) != 2:
        return [f"{key} must be an integer >= 1 or a range [min, max], got {shown}"]
    out = []
    for name, v in zip(("min", "max"), value, strict=True):
        if not _whole(v) or v < 1:
            out.append(f"{key} must have {name} an integer >= 1, got {shown}")
    if not out and value[0] > value[1]:
        out.append(f"{key} must have min <= max, got {shown}")
    return out


@dataclass
class TrackingConfig(_Section):
    """MLflow and run naming."""

    experiment: str = _key("shan", "MLflow experiment")
    run_name: str | None = _key(None, "Ray Train run name (--name); reuse one to continue that run")
    storage_path: str | None = _key(
        None, "Ray Train storage (local dir or s3://); null: ~/ray_results"
    )
    log_every: int = _key(20, "steps between train/loss points")
    keep_checkpoints: int = _key(2, "checkpoints Ray Train keeps (the best by val/rsum)")
    max_failures: int = _key(3, "worker-group restarts from the last checkpoint before giving up")
    checkpoint_upload: str = _key(
        "async",
        "checkpoints reach storage_path in the background (async: the steps go on) or while "
        "the workers wait (sync)",
        CHECKPOINT_UPLOADS,
    )
    system_metrics_every: float = _key(
        10.0, "seconds between system/... samples (CPU, memory, GPU) per node; 0: off"
    )

    def problems(self, prefix: str = "tracking.") -> list[str]:
        p = Problems(prefix)
        p.text("experiment", self.experiment)
        p.named("run_name", self.run_name, optional=True)
        p.text("storage_path", self.storage_path, optional=True)
        p.at_least("log_every", self.log_every, 1)
        p.at_least("keep_checkpoints", self.keep_checkpoints, 1)
        p.at_least("max_failures", self.max_failures, 0)
        p.one_of("checkpoint_upload", self.checkpoint_upload, CHECKPOINT_UPLOADS)
        every = self.system_metrics_every
        if not _finite(every) or not (every == 0 or every >= 1):
            p.bad("system_metrics_every", every, "0 (off) or at least 1 (seconds)")
        return list(p)


@dataclass
class Config(Checked):
    """Everything a training or evaluation job needs."""

    name: str = _key("default", "the config's name, logged with the run")
    seed: int = _key(0, "random seed: initial weights and the data order")
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def problems(self) -> list[str]:
        """Every problem of every section, one line each (empty: the config is valid)."""
        p = Problems("")
        p.named("name", self.name)
        p.at_least("seed", self.seed, 0)
        p.at_most("seed", self.seed, 2**32 - 1)
        out = list(p)
        for section in (
            self.model, self.loss, self.optim, self.data, self.scaling, self.tracking,
        ):  # fmt: skip
            out += section.problems()
        workers, batch = self.scaling.num_workers, self.optim.batch_size
        if isinstance(workers, list) and not _range_problems("", workers):
            workers = workers[1]  # the largest group shares out the global batch too
        if _whole(workers) and _whole(batch) and workers >= 1 and batch >= 2:  # else above
            share = self.optim.share_problem(workers)  # the global batch over the workers
            out += [share] if share else []
        return out

    def validate(self) -> Config:
        """``self``, or a ConfigError listing every problem."""
        self.check()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Dotted keys to values, e.g. ``{"model.d": 1024, ...}`` (for MLflow params)."""
        return _flatten(self.to_dict())


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        names = [_type_name(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in typing.get_args(tp) else "")
    if origin is list:
        return "a list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a text"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


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
        raise ConfigError(f"{key} must be {_type_name(tp)}, got {_show(value)}")
    if origin is list and isinstance(value, list):
        # items of the wrong type are kept for the section's problems(), which reports each
        # item with the length and the range (one place for every problem of the list)
        return [_coerce_or_keep(key, v, typing.get_args(tp)[0]) for v in value]
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key} must be {_type_name(tp)}, got {_show(value)}")


def _coerce_or_keep(key: str, value: Any, tp: Any) -> Any:
    try:
        return _coerce(key, value, tp)
    except ConfigError:
        return value


def _build(cls: type, data: Any, prefix: str, problems: list[str]) -> Any:
    """Dataclass ``cls`` from a nested mapping; each unknown key or badly typed value adds a
    line to ``problems`` and leaves that field at its default."""
    if not isinstance(data, dict):
        problems.append(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {_show(data)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    for name in sorted(set(data) - fields, key=str):
        problems.append(
            f"unknown config key {prefix}{name!s}; known keys under "
            f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(fields))}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            continue
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", problems)
            continue
        try:
            kwargs[name] = _coerce(f"{prefix}{name}", value, tp)
        except ConfigError as e:
            problems += e.problems
    return cls(**kwargs)


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested mapping; unknown keys and wrong types raise one
    ConfigError listing them all."""
    problems: list[str] = []
    out = _build(cls, data, prefix, problems)
    if problems:
        raise ConfigError(*problems)
    return out


def _field_type(key: str) -> Any:
    """The annotation of dotted ``key`` in :class:`Config`, or None when there is no such key."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
        if i == len(parts) - 1:
            return cls
    return None


def _is_text(tp: Any) -> bool:
    if tp is str:
        return True
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and str in typing.get_args(tp)


def _parse_value(key: str, raw: str) -> Any:
    """A YAML scalar, except that a text field takes the text as written (``null`` and an
    empty value still mean None)."""
    value = bounded_yaml(raw, f"override {key}") if raw.strip() else None
    if _is_text(_field_type(key)):
        if value is None or isinstance(value, str):
            return value
        return raw.strip()
    if isinstance(value, str) and _looks_numeric(raw):
        value = float(raw)
    return value


def parse_overrides(overrides: list[str], problems: list[str] | None = None) -> dict[str, Any]:
    """``["model.d=64", "optim.lr=1e-3"]`` -> nested dict. Values are YAML scalars (text fields
    keep the text). Malformed overrides raise one ConfigError listing them all, or are added to
    ``problems`` when it is given."""
    own: list[str] = []
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            own.append(f"override {item!r} is not of the form key=value")
            continue
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            own.append(f"override {item!r} has an empty key")
            continue
        try:
            value = _parse_value(key, raw)
        except yaml.YAMLError:
            own.append(f"override {item[:200]!r}: the value is not a valid YAML scalar")
            continue
        except ConfigError as e:
            own.append(str(e))
            continue
        if not _set(nested, key, value):
            own.append(f"override {item!r} conflicts with another override")
    if problems is not None:
        problems += own
    elif own:
        raise ConfigError(*own)
    return nested


def _set(nested: dict[str, Any], key: str, value: Any) -> bool:
    node = nested
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            return False
    node[parts[-1]] = value
    return True


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
    """A config name (``demo``: ``shan/configs/demo.yaml``, package data) or a YAML file."""
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


# What a config file (or an override's value) may hold: YAML nests a handful of levels, has no
# aliases (a "billion laughs" expands a few aliases into gigabytes) and is small.
YAML_MAX_BYTES = 1_000_000
YAML_MAX_DEPTH = 20


def bounded_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load(text)`` once its events show no alias, no nesting deeper than
    :data:`YAML_MAX_DEPTH` and no more than :data:`YAML_MAX_BYTES` of text; ConfigError naming
    ``source`` (and the line) otherwise. yaml.YAMLError when it is not YAML."""
    if len(text) > YAML_MAX_BYTES:
        raise ConfigError(
            f"{source}: {len(text):,} characters, over the limit of {YAML_MAX_BYTES:,}"
        )
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):  # iterative: no recursion
        line = event.start_mark.line + 1 if event.start_mark else 0
        if isinstance(event, yaml.AliasEvent):
            raise ConfigError(
                f"{source}: line {line}: a YAML alias (*{event.anchor}); aliases are not allowed "
                "in a config, write the value out"
            )
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > YAML_MAX_DEPTH:
                raise ConfigError(
                    f"{source}: line {line}: nested deeper than {YAML_MAX_DEPTH} levels"
                )
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return yaml.safe_load(text)


def _read_config_file(path: Path) -> dict[str, Any]:
    """The mapping of config file ``path``, read within :func:`bounded_yaml`'s limits."""
    size = path.stat().st_size
    if size > YAML_MAX_BYTES:
        raise ConfigError(
            f"config file {path}: {size:,} bytes, over the limit of {YAML_MAX_BYTES:,}"
        )
    try:
        data = bounded_yaml(path.read_text(), f"config file {path}") or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    name_or_file: str | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Load a YAML config (or the dataclass defaults), apply ``key=value`` overrides, then
    ``values`` (dotted keys to Python values, taken as they are: a command line's typed flags),
    and check everything. One ConfigError lists every problem found."""
    data: dict[str, Any] = {}
    if name_or_file is not None:
        data = _read_config_file(resolve_config_path(name_or_file))
    problems: list[str] = []
    data = _merge(data, parse_overrides(overrides or [], problems))
    for key, value in (values or {}).items():
        extra: dict[str, Any] = {}
        _set(extra, key, value)
        data = _merge(data, extra)
    return _checked(data, problems)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from :meth:`Config.to_dict` output (e.g. from a checkpoint)."""
    return _checked(_with_old_first_stage(data), [])


def _with_old_first_stage(data: Any) -> Any:
    """``data`` with ``model.first_stage_pool: attention`` where it has a first stage but no
    pool: a checkpoint from before the choice, whose head is the attention pool's."""
    model = data.get("model") if isinstance(data, dict) else None
    if isinstance(model, dict) and model.get("first_stage_dim") and "first_stage_pool" not in model:
        return {**data, "model": {**model, "first_stage_pool": "attention"}}
    return data


def _checked(data: Any, problems: list[str]) -> Config:
    cfg = _build(Config, _without_retired(data), "", problems)
    problems += cfg.problems()
    if problems:
        raise ConfigError(*problems)
    return cfg


def _without_retired(data: Any) -> Any:
    """``data`` less a ``debug`` section of nulls only: the test hooks that configs (and so
    the checkpoints, and ``--print-config``'s output) carried before they left the config."""
    debug = data.get("debug") if isinstance(data, dict) else None
    if isinstance(debug, dict) and all(v is None for v in debug.values()):
        return {k: v for k, v in data.items() if k != "debug"}
    return data


# -- the key list of ``--help`` --------------------------------------------------------------------
def key_fields(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """``(dotted key, field)`` of every config key, section after section (``name``, ``seed``,
    ``model.feature_dim``, ...); the sections themselves are not keys."""
    out: list[tuple[str, dataclasses.Field]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out += key_fields(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f))
    return out


def _short_type(tp: Any, choices: tuple[Any, ...]) -> str:
    """``int``, ``float|null``, ``{cosine,dot}``: a key's type as ``--help`` shows it."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    names = [a for a in args or (tp,) if a is not type(None)]
    shown = (
        "{" + ",".join(map(str, choices)) + "}"
        if choices
        else "|".join(_short_name(a) for a in names)
    )
    return shown + ("|null" if type(None) in args else "")


def _short_name(tp: Any) -> str:
    """``int``, ``[int,int]`` (a list: a range), ...: one type as ``--help`` shows it."""
    if typing.get_origin(tp) is list:
        item = _short_name(typing.get_args(tp)[0])
        return f"[{item},{item}]"
    return {int: "int", float: "float", bool: "bool", str: "text"}.get(tp, str(tp))


def _show_default(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    if isinstance(value, float):
        text = f"{value:g}"
        return text if any(c in text for c in ".en") else text + ".0"  # 9.0, not 9
    return str(value)


KIND_WIDTH = 23  # "{hardest,all} = hardest"; longer enumerations list their values below


def keys_help(width: int = 100) -> str:
    """The config keys, a line or more each, grouped by section: key, type, default, meaning
    (from the dataclass fields' ``help`` metadata). The epilog of ``shan train --help``."""
    rows = key_fields()
    key_w = max(len(k) for k, _ in rows)
    left_w = 2 + key_w + 2 + KIND_WIDTH
    lines = ["config keys (key=value on the command line, or nested in the YAML file):"]
    section = None
    for key, f in rows:
        head = key.rpartition(".")[0]
        if head != section:
            section = head
            lines += ["", *_section_heading(head, width)]
        kind, text = _kind_and_text(key, f)
        left = f"  {key:<{key_w}}  {kind}"
        wrapped = textwrap.wrap(text, width - left_w - 2) or [""]
        if len(left) > left_w:
            lines.append(left)
        else:
            lines.append(f"{left:<{left_w}}  {wrapped.pop(0)}")
        lines += [" " * (left_w + 2) + t for t in wrapped]
    return "\n".join(lines)


def _kind_and_text(key: str, f: dataclasses.Field) -> tuple[str, str]:
    """``{cosine,dot} = cosine`` and the meaning; an enumeration too long for the column is
    ``text = PACK`` with its values after the meaning."""
    choices, default = f.metadata.get("choices", ()), _show_default(f.default)
    meaning = f.metadata.get("help", "")  # a field without one fails tests/unit/test_config.py
    kind = f"{_short_type(_field_type(key), choices)} = {default}"
    if len(kind) <= KIND_WIDTH or not choices:
        return kind, meaning
    values = ", ".join(map(str, choices)) + (" or null" if f.default is None else "")
    return (
        f"{_short_type(_field_type(key), ())} = {default}",
        f"{meaning}; one of {values}",
    )


def _section_heading(section: str, width: int) -> list[str]:
    """``model.*: SHAN's architecture (...)``: the section's docstring, wrapped."""
    if not section:
        return ["top level:"]
    cls = typing.get_type_hints(Config)[section]
    doc = " ".join((cls.__doc__ or "").replace("``", "").split())
    return textwrap.wrap(f"{section}.*: {doc}", width, subsequent_indent="  ")
