"""A sweep file: the search space over config keys, ASHA's settings and the table's layout.

    space:                                   # dotted config keys (shan train --help lists them)
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      loss.margin: {grid: [0.1, 0.2, 0.4]}   # every value, crossed with the other grids
      model.mu: {uniform: [0.3, 0.7]}
      model.direction: {choice: [full, i2t, t2i]}
    num_samples: 2                           # each grid point this many times (draws anew)
    asha: {max_t: 10, grace_period: 1, reduction_factor: 2}   # absent: no early stopping
    table: default                           # or paper-ablation (with trials)
    max_concurrent_trials: 4                 # absent: as many as the cluster holds now

or, instead of ``space``, named ``trials`` (``- {name: G2G, model.w_l2l: 0, ...}``): one trial
each, in that order. The file is read within the configs' YAML bounds
(:func:`shan.config.bounded_yaml`) and checked in one place (:func:`load_sweep`), every problem
at once, before anything starts: each grid value, choice and bound is put into the training
config, which checks it as ``shan train`` would.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shan.config import (
    YAML_MAX_BYTES,
    Config,
    ConfigError,
    bounded_yaml,
    config_from_dict,
    key_fields,
    name_problem,
)

KINDS = ("grid", "choice", "uniform", "loguniform")  # a dimension of the space
TABLES = ("default", "paper-ablation")  # the parent run's table layouts
TOP_KEYS = ("name", "space", "trials", "num_samples", "asha", "table", "max_concurrent_trials")
ASHA_KEYS = ("max_t", "grace_period", "reduction_factor")
# what every trial shares: its sizing, tracking and length (asha.max_t, or optim.epochs)
FIXED = ("name", "data.path", "optim.epochs", "scaling.", "tracking.")
MAX_TRIALS = 1000
ROW_KEY = "row"  # Tune's key of a sweep with named trials: the row's name


@dataclass(frozen=True)
class Dimension:
    """One swept key: ``grid``/``choice`` values, or the ``(low, high)`` of a distribution."""

    key: str
    kind: str
    values: tuple[Any, ...]

    def tune_domain(self) -> Any:
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        sample = tune.uniform if self.kind == "uniform" else tune.loguniform
        return sample(*self.values)


@dataclass(frozen=True)
class Asha:
    """ASHA's settings on ``val/rsum`` (max), in epochs."""

    max_t: int
    grace_period: int = 1
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class Row:
    """A named trial: its values (dotted key -> value)."""

    name: str
    values: dict[str, Any]


@dataclass
class Sweep:
    """A checked sweep file."""

    source: str
    name: str | None = None
    dims: list[Dimension] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    num_samples: int = 1
    asha: Asha | None = None
    table: str = "default"
    max_concurrent: int | None = None  # None: as many as the cluster holds

    def keys(self) -> list[str]:
        """The swept keys, in the file's order."""
        if self.rows:
            return list(dict.fromkeys(k for r in self.rows for k in r.values))
        return [d.key for d in self.dims]

    def trial_count(self) -> int:
        if self.rows:
            return len(self.rows)
        grid = math.prod(len(d.values) for d in self.dims if d.kind == "grid")
        return grid * self.num_samples

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: a dimension per key, or a grid over the rows' names."""
        from ray import tune

        if self.rows:
            return {ROW_KEY: tune.grid_search([r.name for r in self.rows])}
        return {d.key: d.tune_domain() for d in self.dims}

    def values_of(self, config: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """(row name or None, dotted key -> value) of a trial's Tune ``config``."""
        if self.rows:
            row = next(r for r in self.rows if r.name == config[ROW_KEY])
            return row.name, dict(row.values)
        return None, {d.key: config[d.key] for d in self.dims}

    def epochs(self, cfg: Config) -> int:
        """A trial's epochs: ``asha.max_t``, else the config's ``optim.epochs``."""
        return self.asha.max_t if self.asha else cfg.optim.epochs

    def params(self) -> dict[str, str]:
        """The sweep as MLflow params of the parent run (``sweep.space.optim.lr``, ...)."""
        out = {"sweep.file": self.source, "sweep.table": self.table}
        for d in self.dims:
            out[f"sweep.space.{d.key}"] = f"{d.kind} {list(d.values)}"
        for i, r in enumerate(self.rows, 1):  # a row's name may hold what a key may not ("+")
            values = ", ".join(f"{k}={v}" for k, v in r.values.items())
            out[f"sweep.trial.{i:02d}"] = f"{r.name}: {values}"
        out["sweep.num_samples"] = str(self.num_samples)
        if self.asha:
            out.update(
                {f"sweep.asha.{k}": str(v) for k, v in dataclasses.asdict(self.asha).items()}
            )
        return out


def with_values(base: Config, values: dict[str, Any]) -> Config:
    """``base`` with dotted ``values`` set, checked as a whole (a ConfigError lists every
    problem): a trial's config."""
    data = base.to_dict()
    for key, value in values.items():
        *heads, last = key.split(".")
        node = data
        for head in heads:
            node = node[head]
        node[last] = value
    return config_from_dict(data)


def key_type(key: str) -> Any:
    """The annotation of config key ``key`` (a dotted key of ``key_fields``)."""
    cls: Any = Config
    for part in key.split("."):
        cls = typing.get_type_hints(cls)[part]
    return cls


def load_sweep(path: str | Path, base: Config) -> Sweep:
    """The sweep file at ``path``, checked against the training config ``base`` (every trial's
    config is ``base`` with the trial's values); one ConfigError lists every problem."""
    path = Path(path)
    src = f"sweep file {path}"
    if not path.is_file():
        raise ConfigError(f"{src} does not exist")
    if path.stat().st_size > YAML_MAX_BYTES:
        raise ConfigError(f"{src}: {path.stat().st_size:,} bytes, over {YAML_MAX_BYTES:,}")
    try:
        data = bounded_yaml(path.read_text(errors="replace"), src)
    except yaml.YAMLError as e:
        raise ConfigError(f"{src} is not valid YAML: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{src} must hold a mapping (space, asha, ...), got {_short(data)}")
    problems: list[str] = []
    sweep = parse(data, str(path), base, problems)
    if problems:
        raise ConfigError(*(f"{src}: {p}" for p in problems))
    return sweep


def parse(data: dict[str, Any], source: str, base: Config, problems: list[str]) -> Sweep:
    """A :class:`Sweep` of the file's mapping ``data``; each problem is added to ``problems``."""
    for key in data:
        if key not in TOP_KEYS:
            problems.append(f"unknown key {key!r}; known keys: {', '.join(TOP_KEYS)}")
    sweep = Sweep(source=source)
    if data.get("name") is not None:
        why = name_problem(data["name"])
        problems += [f"name {why}"] if why else []
        sweep.name = None if why else data["name"]
    sweep.table = _table(data.get("table", "default"), problems)
    sweep.num_samples = _count("num_samples", data.get("num_samples", 1), problems)
    sweep.asha = _asha(data.get("asha"), problems)
    if data.get("max_concurrent_trials") is not None:
        sweep.max_concurrent = _count(
            "max_concurrent_trials", data["max_concurrent_trials"], problems
        )
    if data.get("space") is not None and data.get("trials") is not None:
        problems.append("give either space (a search space) or trials (named rows), not both")
    elif data.get("trials") is not None:
        sweep.rows = _rows(data["trials"], base, problems)
        if sweep.num_samples != 1:
            problems.append("num_samples must be 1 with trials (each row is one trial)")
    else:
        sweep.dims = _space(data.get("space"), base, problems)
    if sweep.table == "paper-ablation" and not data.get("trials"):
        problems.append("table paper-ablation needs trials (the paper's rows, named)")
    if not problems and sweep.trial_count() > MAX_TRIALS:
        problems.append(f"the sweep makes {sweep.trial_count():,} trials, over {MAX_TRIALS}")
    return sweep


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:70] + "..."


def _table(value: Any, problems: list[str]) -> str:
    if value in TABLES:
        return str(value)
    problems.append(f"table must be one of {', '.join(TABLES)}, got {_short(value)}")
    return "default"


def _count(name: str, value: Any, problems: list[str], low: int = 1) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= low:
        return value
    problems.append(f"{name} must be an integer >= {low}, got {_short(value)}")
    return low


def _asha(data: Any, problems: list[str]) -> Asha | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        problems.append(f"asha must be a mapping ({', '.join(ASHA_KEYS)}), got {_short(data)}")
        return None
    for key in data:
        if key not in ASHA_KEYS:
            problems.append(f"asha: unknown key {key!r}; known keys: {', '.join(ASHA_KEYS)}")
    if "max_t" not in data:
        problems.append("asha.max_t (the epochs of a trial that is never stopped) is missing")
    max_t = _count("asha.max_t", data.get("max_t", 1), problems)
    grace = _count("asha.grace_period", data.get("grace_period", 1), problems)
    if grace > max_t:
        problems.append(f"asha.grace_period ({grace}) must be at most asha.max_t ({max_t})")
    factor = data.get("reduction_factor", 2)
    if not _number(factor) or factor <= 1:
        problems.append(f"asha.reduction_factor must be a number > 1, got {_short(factor)}")
        factor = 2
    return Asha(max_t, grace, float(factor))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _key_problem(key: Any) -> str | None:
    """Why ``key`` cannot be swept (None: it can)."""
    known = {k for k, _ in key_fields()}
    if not isinstance(key, str) or key not in known:
        return f"unknown config key {_short(key)} (shan train --help lists the keys)"
    if any(key == f or (f.endswith(".") and key.startswith(f)) for f in FIXED):
        return (
            f"{key} cannot be swept: every trial shares it (set it with key=value or a flag; "
            "a trial's epochs are asha.max_t)"
        )
    return None


def _space(data: Any, base: Config, problems: list[str]) -> list[Dimension]:
    if not isinstance(data, dict) or not data:
        problems.append(
            "the search space is empty: give space (config keys, each a grid or a "
            "distribution) or trials (named rows)"
            + ("" if data is None or isinstance(data, dict) else f", got {_short(data)}")
        )
        return []
    dims = []
    for key, spec in data.items():
        why = _key_problem(key)
        if why:
            problems.append(f"space: {why}")
            continue
        dim = _dimension(key, spec, problems)
        if dim is not None and _values_fit(dim, base, problems):
            dims.append(dim)
    return dims


def _dimension(key: str, spec: Any, problems: list[str]) -> Dimension | None:
    where = f"space.{key}"
    if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in KINDS:
        problems.append(
            f"{where} must be one of {{grid: [values]}}, {{choice: [values]}}, "
            f"{{uniform: [low, high]}}, {{loguniform: [low, high]}}, got {_short(spec)}"
        )
        return None
    kind, values = next(iter(spec.items()))
    if not isinstance(values, list) or not values:
        problems.append(f"{where}: {kind} needs a non-empty list, got {_short(values)}")
        return None
    if kind in ("grid", "choice"):
        return Dimension(key, kind, tuple(values))
    if len(values) != 2 or not all(_number(v) for v in values) or values[0] >= values[1]:
        problems.append(f"{where}: {kind} needs [low, high], two numbers low < high, got {values}")
        return None
    if kind == "loguniform" and values[0] <= 0:
        problems.append(f"{where}: loguniform needs low > 0, got {values[0]}")
        return None
    if key_type(key) is not float:
        problems.append(f"{where}: {kind} draws numbers, but {key} is not a number: use grid")
        return None
    return Dimension(key, kind, (float(values[0]), float(values[1])))


def _values_fit(dim: Dimension, base: Config, problems: list[str]) -> bool:
    """Whether each value (or bound) of ``dim`` makes a valid training config; a problem per
    value that does not."""
    what = "bound" if dim.kind in ("uniform", "loguniform") else "value"
    ok = True
    for value in dim.values:
        try:
            with_values(base, {dim.key: value})
        except ConfigError as e:
            ok = False
            problems += [
                f"space.{dim.key}: {dim.kind} {what} {_short(value)}: {p}" for p in e.problems
            ]
    return ok


def _rows(data: Any, base: Config, problems: list[str]) -> list[Row]:
    if not isinstance(data, list) or not data:
        problems.append(f"trials must be a non-empty list of named rows, got {_short(data)}")
        return []
    rows: list[Row] = []
    for i, item in enumerate(data):
        row = _row(i, item, base, problems)
        if row is not None and any(r.name == row.name for r in rows):
            problems.append(f"trials[{i}]: the name {row.name!r} is taken by an earlier row")
        elif row is not None:
            rows.append(row)
    return rows


def _row(i: int, item: Any, base: Config, problems: list[str]) -> Row | None:
    if not isinstance(item, dict) or "name" not in item:
        problems.append(f"trials[{i}] must be a mapping with a name, got {_short(item)}")
        return None
    name = item["name"]
    if not isinstance(name, str) or not name.strip() or len(name) > 60:
        problems.append(
            f"trials[{i}]: name must be a text of 1 to 60 characters, got {_short(name)}"
        )
        return None
    values = {k: v for k, v in item.items() if k != "name"}
    bad = [(k, why) for k in values if (why := _key_problem(k))]
    problems += [f"trials[{i}] ({name}): {why}" for _, why in bad]
    if not values:
        problems.append(f"trials[{i}] ({name}) sets no config key")
    if bad or not values:
        return None
    try:
        with_values(base, values)
    except ConfigError as e:
        problems += [f"trials[{i}] ({name}): {p}" for p in e.problems]
        return None
    return Row(name, values)


def grid_points(sweep: Sweep) -> list[dict[str, Any]]:
    """Every combination of the grid dimensions (the random ones left out): for tests and
    for the count that Tune will run (times ``num_samples``)."""
    grids = [d for d in sweep.dims if d.kind == "grid"]
    return [
        dict(zip([d.key for d in grids], combo))
        for combo in itertools.product(*(d.values for d in grids))
    ]
