"""Bad inputs of ``jobs/sweep.py``, each tried through the real command line.

Every problem of the sweep file (an unknown key, an empty space, a value out of range, ...) is
an ``error:`` line, all at once, before Ray starts or an MLflow run is touched: the cases run
with an MLflow address where nobody listens and no Ray address, so a check that came too late
would show up as another error. They run through the job's ``main`` in this process, one as a
subprocess of ``jobs/sweep.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from shan_stack import free_port

from tests.cli import Case, assert_user_error, run_case
from tests.helpers import TINY
from tests.integration.test_bad_inputs_train import BILLION_LAUGHS


def sweep_file(text: str, *args: str):
    """argv: a sweep file holding ``text`` (written under tmp), the tiny config, and ``args``."""

    def argv(tmp: Path) -> list[str]:
        (tmp / "sweep.yaml").write_text(text)
        return [str(tmp / "sweep.yaml"), "--config", TINY, "--data", str(tmp / "no-data"), *args]

    return argv


ONE = "space: {loss.margin: {grid: [0.1, 0.2]}}\n"

CASES: list[Case] = [
    Case("sweep-unknown-key", "sweep", "a swept key that is no config key (`optim.lrr`)",
         sweep_file("space: {optim.lrr: {grid: [0.1]}}\n"), ("sweep.yaml", "optim.lrr")),
    Case("sweep-empty-space", "sweep", "an empty search space (`space: {}`)",
         sweep_file("space: {}\n"), ("sweep.yaml", "the search space is empty")),
    Case("sweep-value-out-of-range", "sweep", "a grid value the config refuses (`loss.margin` -1)",
         sweep_file("space: {loss.margin: {grid: [0.2, -1]}}\n"),
         ("sweep.yaml", "space.loss.margin", "grid value -1", "loss.margin must be >= 0")),
    Case("sweep-bound-out-of-range", "sweep", "a bound out of range (`model.mu` up to 2)",
         sweep_file("space: {model.mu: {uniform: [0.5, 2]}}\n"), ("space.model.mu", "bound 2.0")),
    Case("sweep-fixed-key", "sweep", "a key every trial shares (`scaling.num_workers`)",
         sweep_file("space: {scaling.num_workers: {grid: [1, 2]}}\n"),
         ("scaling.num_workers cannot be swept",)),
    Case("sweep-several-problems", "sweep",
         "an unknown key, an empty grid, a bad value and a bad ASHA setting together",
         sweep_file("space:\n  optim.lrr: {grid: [1]}\n  model.direction: {grid: []}\n"
                    "  optim.lr: {grid: [-1]}\nasha: {max_t: 0}\n"),
         ("optim.lrr", "model.direction", "optim.lr must be > 0", "asha.max_t"), lines=4,
         subprocess=True),
    Case("sweep-paper-table-without-rows", "sweep", "`table: paper-ablation` over a space",
         sweep_file(ONE + "table: paper-ablation\n"), ("paper-ablation needs trials",)),
    Case("sweep-billion-laughs", "sweep", 'a sweep file of nested YAML aliases ("billion laughs")',
         sweep_file(BILLION_LAUGHS), ("sweep.yaml", "alias")),
    Case("sweep-missing-file", "sweep", "a sweep file that does not exist",
         lambda tmp: [str(tmp / "nope.yaml"), "--config", TINY], ("nope.yaml", "does not exist")),
    Case("sweep-bad-override", "sweep", "a bad override for every trial (`optim.lr=-1`)",
         sweep_file(ONE, "optim.lr=-1"), ("optim.lr", "-1.0")),
    Case("sweep-flag-workers-zero", "sweep", "`--workers 0`", sweep_file(ONE, "--workers", "0"),
         ("--workers", "0")),
]  # fmt: skip


def case_env() -> dict:
    """A tracking server nobody answers and no Ray address: a late check fails differently."""
    return {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}", "RAY_ADDRESS": ""}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case: Case, tmp_path):
    r = run_case(case, *case.argv(tmp_path), env={**case_env(), **case.env},
                 cwd=tmp_path, timeout=120)  # fmt: skip
    assert_user_error(r, *case.names, lines=case.lines)
    assert "unreachable" not in r.stderr and "Ray:" not in r.stdout + r.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_the_data_set_is_checked_before_ray(tmp_path):
    """A good sweep file: the next check, the missing data set, is the error."""
    from tests.cli import run_main

    r = run_main("sweep", *sweep_file(ONE)(tmp_path), env=case_env(), cwd=tmp_path)
    assert_user_error(r, "no-data")
