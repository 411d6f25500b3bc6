"""The sweep's table (both layouts) and its plot."""

from __future__ import annotations

import pytest

from shan.config import load_config
from shan.sweep.report import Trial, best, default_table, note, paper_table, plot, ranked
from shan.sweep.spec import Asha, Dimension, Row, Sweep
from tests.helpers import TINY


@pytest.fixture(scope="module")
def base():
    return load_config(TINY)


SPACE = Sweep(
    source="s.yaml",
    dims=[
        Dimension("optim.lr", "loguniform", (1e-4, 1e-2)),
        Dimension("model.direction", "grid", ("full", "i2t")),
    ],
    asha=Asha(4, 1, 2.0),
)


def trials() -> list[Trial]:
    return [
        Trial("t01", {"optim.lr": 1e-4, "model.direction": "full"}, 120.5, 1, True, "run1"),
        Trial("t02", {"optim.lr": 3e-3, "model.direction": "i2t"}, 210.25, 4, False, "run2"),
        Trial("t03", {"optim.lr": 1e-2, "model.direction": "full"}, None, 0, False, None,
              error="non-finite loss"),
        Trial("t04", {"optim.lr": 1e-3, "model.direction": "i2t"}, 180.0, 2, True, "run4"),
    ]  # fmt: skip


def test_ranked_best_first_failed_last():
    assert [t.name for t in ranked(trials())] == ["t02", "t04", "t01", "t03"]
    top = best(trials())
    assert top is not None and top.name == "t02"
    assert best([trials()[2]]) is None


def test_default_table(base):
    lines = default_table(SPACE, trials()).splitlines()
    assert lines[0] == (
        "| rank | trial | `optim.lr` | `model.direction` | val/rsum | epochs | outcome | run |"
    )
    assert lines[2] == "| 1 | t02 | 0.003 | i2t | 210.2 | 4 | ran to the end | `run2` |"
    assert lines[3].startswith("| 2 | t04 | 0.001 | i2t | 180.0 | 2 | stopped early (ASHA) |")
    assert lines[5] == "| 4 | t03 | 0.01 | full | – | 0 | failed: non-finite loss | – |"
    assert len(lines) == 6


def test_paper_table_keeps_the_rows_order_and_names_the_steps(base):
    sweep = Sweep(source="p.yaml", table="paper-ablation", rows=[
        Row("G2G", {"model.w_l2l": 0, "model.w_g2l": 0, "model.w_g2g": 1}),
        Row("SHAN (T2I)", {"model.direction": "t2i", "loss.per_step": True}),
    ])  # fmt: skip
    done = [
        Trial("SHAN (T2I)", sweep.rows[1].values, 250.0, 2, False, "b"),
        Trial("G2G", sweep.rows[0].values, 100.0, 2, False, "a"),
    ]
    lines = paper_table(sweep, done, base).splitlines()
    assert lines[0].startswith("| row | steps in the score | loss on | direction | val/rsum |")
    assert lines[2].startswith("| G2G | G2G | total | full | 100.0 | 2 | 2 |")
    assert lines[3].startswith(
        "| SHAN (T2I) | L2L + G2L + G2G | total + each step | T2I | 250.0 | 1 |"
    )


def test_note_names_the_best_trial_and_asha(base):
    text = note(SPACE, trials(), base, "sweep-x")
    assert "Best: **t02**, val/rsum 210.2 (child run `run2`)" in text
    assert "max_t 4, grace period 1, reduction factor 2" in text
    assert default_table(SPACE, trials()) in text


def test_plot_is_a_png():
    png = plot(SPACE, trials(), "sweep x")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    rows = Sweep(source="p", rows=[Row("a", {"loss.margin": 0.1}), Row("b", {"loss.margin": 0.3})])
    bars = plot(
        rows, [Trial("a", {}, 10.0, 1, False, "x"), Trial("b", {}, 20.0, 1, False, "y")], "t"
    )
    assert bars[:4] == b"\x89PNG"
