"""The sweep file: its parts, and every problem reported at once before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from shan.config import ConfigError, load_config
from shan.sweep.spec import ROW_KEY, load_sweep, with_values
from tests.helpers import ROOT, TINY


@pytest.fixture(scope="module")
def base():
    return load_config(TINY)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, base, text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_sweep(write(tmp_path, text), base)
    return e.value.problems


def test_a_space_of_grids_and_distributions(tmp_path, base):
    sweep = load_sweep(write(tmp_path, """
space:
  optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
  loss.margin: {grid: [0.1, 0.2, 0.4]}
  model.direction: {grid: [full, i2t]}
  model.mu: {uniform: [0.3, 0.7]}
  loss.negatives: {choice: [hardest, all]}
num_samples: 2
asha: {max_t: 6, grace_period: 2, reduction_factor: 3}
"""), base)  # fmt: skip
    assert sweep.keys() == ["optim.lr", "loss.margin", "model.direction", "model.mu",
                            "loss.negatives"]  # fmt: skip
    assert sweep.trial_count() == 3 * 2 * 2  # the grids crossed, num_samples times
    assert sweep.asha is not None and (sweep.asha.max_t, sweep.asha.grace_period) == (6, 2)
    assert sweep.epochs(base) == 6
    space = sweep.param_space()
    assert space["loss.margin"] == {"grid_search": [0.1, 0.2, 0.4]}
    assert space["optim.lr"].lower == 1e-4 and space["optim.lr"].upper == 1e-2
    drawn = {"optim.lr": 1e-3, "loss.margin": 0.2, "model.direction": "i2t", "model.mu": 0.5,
             "loss.negatives": "all"}  # fmt: skip
    assert sweep.values_of(drawn) == (None, drawn)
    assert sweep.params()["sweep.space.loss.margin"] == "grid [0.1, 0.2, 0.4]"


def test_named_trials_are_a_grid_over_their_names(tmp_path, base):
    sweep = load_sweep(write(tmp_path, """
table: paper-ablation
trials:
  - {name: G2G, model.w_l2l: 0, model.w_g2l: 0, model.w_g2g: 1}
  - {name: SHAN-I2T, model.direction: i2t}
"""), base)  # fmt: skip
    assert sweep.trial_count() == 2 and sweep.asha is None and sweep.epochs(base) == 2
    assert sweep.param_space() == {ROW_KEY: {"grid_search": ["G2G", "SHAN-I2T"]}}
    assert sweep.values_of({ROW_KEY: "SHAN-I2T"}) == ("SHAN-I2T", {"model.direction": "i2t"})
    assert sweep.keys() == ["model.w_l2l", "model.w_g2l", "model.w_g2g", "model.direction"]


def test_every_problem_at_once(tmp_path, base):
    found = problems(
        tmp_path,
        base,
        """
space:
  optim.lrr: {grid: [0.1]}
  loss.margin: {grid: [0.2, -1, .inf]}
  optim.lr: {loguniform: [0, 1]}
  model.mu: {uniform: [0.5, 2.0]}
  model.d: {uniform: [8, 64]}
  model.direction: {grid: []}
  tracking.experiment: {grid: [a, b]}
  loss.negatives: {normal: [0, 1]}
num_samples: 0
asha: {max_t: 2, grace_period: 3, reduction_factor: 1}
table: fancy
colour: red
""",
    )
    text = "\n".join(found)
    assert all(p.startswith("sweep file ") for p in found), found
    expected = [
        "unknown key 'colour'",
        "table must be one of default, paper-ablation, got 'fancy'",
        "num_samples must be an integer >= 1, got 0",
        "asha.grace_period (3) must be at most asha.max_t (2)",
        "asha.reduction_factor must be a number > 1, got 1",
        "unknown config key 'optim.lrr'",
        "space.loss.margin: grid value -1: loss.margin must be >= 0 and finite, got -1.0",
        "space.loss.margin: grid value inf: loss.margin must be >= 0 and finite, got inf",
        "space.optim.lr: loguniform needs low > 0, got 0",
        "space.model.mu: uniform bound 2.0: model.mu must be in [0, 1], got 2.0",
        "space.model.d: uniform draws numbers, but model.d is not a number",
        "space.model.direction: grid needs a non-empty list, got []",
        "tracking.experiment cannot be swept",
        "space.loss.negatives must be one of {grid: [values]}",
    ]
    for line in expected:
        assert line in text, line
    assert len(found) == len(expected), found
    assert "0.2" not in text  # a valid value is not a problem


def test_an_empty_space(tmp_path, base):
    for text in ("asha: {max_t: 3}\n", "space: {}\n", "space:\n"):
        (line,) = problems(tmp_path, base, text)
        assert "the search space is empty" in line


def test_named_trials_problems(tmp_path, base):
    found = problems(
        tmp_path,
        base,
        """
table: paper-ablation
num_samples: 2
trials:
  - {name: ok, model.direction: i2t}
  - {name: ok, model.direction: t2i}
  - {name: no-steps, model.w_l2l: 0, model.w_g2l: 0, model.w_g2g: 0}
  - {name: bad-key, model.colour: red}
  - {model.direction: full}
""",
    )
    text = "\n".join(found)
    assert "num_samples must be 1 with trials" in text
    assert "trials[1]: the name 'ok' is taken" in text
    assert (
        "trials[2] (no-steps): model.w_l2l, model.w_g2l and model.w_g2g must not all be 0" in text
    )
    assert "trials[3] (bad-key): unknown config key 'model.colour'" in text
    assert "trials[4] must be a mapping with a name" in text
    assert len(found) == 5, found


def test_paper_table_needs_trials_and_not_both(tmp_path, base):
    found = problems(
        tmp_path,
        base,
        """
table: paper-ablation
space: {loss.margin: {grid: [0.1]}}
trials: [{name: a, loss.margin: 0.1}]
""",
    )
    assert any("either space (a search space) or trials" in p for p in found), found


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a: &a [1]\nb: *a\n", "alias"),
        ("space: " + "[" * 30 + "]" * 30 + "\n", "nested deeper than 20"),
        ("space: [unclosed\n", "is not valid YAML"),
        ("- a list\n", "must hold a mapping"),
    ],
)
def test_the_yaml_bounds_of_configs(tmp_path, base, text, fragment):
    (line,) = problems(tmp_path, base, text)
    assert fragment in line and "sweep.yaml" in line


def test_a_missing_file(tmp_path, base):
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep(tmp_path / "nope.yaml", base)


def test_with_values_checks_the_whole_config(base):
    cfg = with_values(base, {"loss.margin": 1, "model.direction": "t2i"})
    assert cfg.loss.margin == 1.0 and isinstance(cfg.loss.margin, float)
    assert base.loss.margin == 0.2  # the base is left alone
    with pytest.raises(ConfigError, match="optim.lr"):
        with_values(base, {"optim.lr": -1})


def test_the_shipped_sweeps_load(base):
    """...and their params are MLflow param names (a row's name may hold "+", "(")."""
    from mlflow.utils.validation import _validate_param_name

    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        sweep = load_sweep(path, base)
        assert sweep.trial_count() >= 1, path
        for key in sweep.params():
            _validate_param_name(key)
    rows = load_sweep(ROOT / "sweeps" / "paper-ablation.yaml", base).params()
    assert rows["sweep.trial.04"].startswith("L2L + G2L: model.w_l2l=0.5")
