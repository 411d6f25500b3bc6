"""What a sweep shows: its trials as a table (the parent run's description) and one plot of
dev rsum against the swept keys (the parent run's artifact ``sweep.png``).

Two layouts (the sweep file's ``table``): ``default`` ranks the trials by their best
``val/rsum``, best first; ``paper-ablation`` keeps the paper's rows in the file's order and
names the steps in the total score and in the loss, and the direction (docs/model.md §6, §7).
matplotlib is imported only when the plot is drawn.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

from shan.config import Config
from shan.sweep.spec import Sweep, with_values

STEPS = ("l2l", "g2l", "g2g")  # the paper's names, docs/model.md §6


@dataclass
class Trial:
    """One trial as the sweep saw it."""

    name: str  # the child run's name (the row's name with named trials)
    values: dict[str, Any]  # the swept keys' values
    rsum: float | None  # the best val/rsum of its epochs (None: no epoch ended)
    epochs: int  # epochs it ran
    stopped: bool  # stopped early by ASHA
    run_id: str | None  # the child MLflow run
    error: str | None = None  # why it failed


def ranked(trials: list[Trial]) -> list[Trial]:
    """Best ``val/rsum`` first; trials without one last, in their order."""
    return sorted(trials, key=lambda t: -t.rsum if t.rsum is not None else math.inf)


def best(trials: list[Trial]) -> Trial | None:
    """The trial of the highest ``val/rsum`` (None: no trial ended an epoch)."""
    done = [t for t in trials if t.rsum is not None]
    return max(done, key=lambda t: t.rsum or 0.0) if done else None


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _outcome(t: Trial) -> tuple[str, str]:
    """(rsum, status) cells."""
    rsum = "–" if t.rsum is None else f"{t.rsum:.1f}"
    if t.error:
        return rsum, f"failed: {t.error[:80]}"
    return rsum, "stopped early (ASHA)" if t.stopped else "ran to the end"


def _run(t: Trial) -> str:
    return f"`{t.run_id}`" if t.run_id else "–"


def default_table(sweep: Sweep, trials: list[Trial]) -> str:
    """Markdown: rank, trial, a column per swept key, val/rsum, epochs, outcome, child run."""
    keys = sweep.keys()
    head = ["rank", "trial", *(f"`{k}`" for k in keys), "val/rsum", "epochs", "outcome", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, t in enumerate(ranked(trials), 1):
        rsum, status = _outcome(t)
        cells = [str(i), t.name, *(_value(t.values.get(k, "–")) for k in keys), rsum,
                 str(t.epochs), status, _run(t)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def steps_cell(weights: dict[str, float]) -> str:
    """``L2L + G2G``: the steps of non-zero weight (``weights``: step -> weight)."""
    return " + ".join(s.upper() for s in STEPS if weights[s] > 0)


def paper_table(sweep: Sweep, trials: list[Trial], base: Config) -> str:
    """Markdown in the paper's layout: the rows in the file's order, each named as in the
    paper, with the steps in the total score and in the loss, the direction, val/rsum and its
    rank among the rows."""
    rank = {id(t): i for i, t in enumerate(ranked(trials), 1)}
    head = ["row", "steps in the score", "loss on", "direction", "val/rsum", "rank", "epochs",
            "outcome", "run"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_name = {t.name: t for t in trials}
    for row in sweep.rows:
        t = by_name.get(row.name)
        if t is None:
            continue
        cfg = with_values(base, row.values)
        m = cfg.model
        steps = steps_cell({"l2l": m.w_l2l, "g2l": m.w_g2l, "g2g": m.w_g2g})
        loss = "total + each step" if cfg.loss.per_step else "total"
        rsum, status = _outcome(t)
        cells = [row.name, steps, loss, m.direction.upper() if m.direction != "full" else "full",
                 rsum, str(rank[id(t)]), str(t.epochs), status, _run(t)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(sweep: Sweep, trials: list[Trial], base: Config) -> str:
    """The sweep's table in its layout (``sweep.table``)."""
    if sweep.table == "paper-ablation":
        return paper_table(sweep, trials, base)
    return default_table(sweep, trials)


def note(sweep: Sweep, trials: list[Trial], base: Config, run_name: str) -> str:
    """Markdown: the parent run's description."""
    top = best(trials)
    lines = [f"### Sweep `{run_name}`: {len(trials)} trials", ""]
    if top is not None:
        lines += [f"Best: **{top.name}**, val/rsum {top.rsum:.1f} (child run `{top.run_id}`).", ""]
    asha = sweep.asha
    lines += [
        "ASHA on val/rsum (max): "
        + (f"max_t {asha.max_t}, grace period {asha.grace_period}, reduction factor "
           f"{asha.reduction_factor:g}." if asha else "off (every trial runs to the end).")
        + " val/rsum: the best epoch's dev rsum, out of 600.",
        "",
        table(sweep, trials, base),
        "",
    ]  # fmt: skip
    return "\n".join(lines)


def plot(sweep: Sweep, trials: list[Trial], title: str) -> bytes:
    """PNG: the best val/rsum of each trial against each swept key (a panel per key; hollow
    marks: stopped early), or a bar per row with named trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in trials if t.rsum is not None]
    keys = [] if sweep.rows else sweep.keys()
    panels = max(1, len(keys))
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels if keys else 8, 4), squeeze=False)
    if not keys:
        _bars(axes[0][0], done)
    for ax, key in zip(axes[0], keys):
        _scatter(
            ax, key, done, log=any(d.key == key and d.kind == "loguniform" for d in sweep.dims)
        )
    if keys:
        axes[0][0].set_ylabel("best val/rsum")
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _scatter(ax: Any, key: str, trials: list[Trial], log: bool) -> None:
    xs = [t.values.get(key) for t in trials]
    numeric = all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs)
    labels = sorted({str(x) for x in xs}) if not numeric else []
    pos = [float(x) if numeric else labels.index(str(x)) for x in xs]  # type: ignore[arg-type]
    for stopped in (False, True):
        pts = [(p, t.rsum) for p, t in zip(pos, trials) if t.stopped == stopped]
        if pts:
            label = "stopped early" if stopped else "ran to the end"
            face = "none" if stopped else "C0"
            ax.scatter(*zip(*pts), s=40, label=label, facecolors=face, edgecolors="C0")
    if labels:
        ax.set_xticks(range(len(labels)), labels)
    if log and numeric:
        ax.set_xscale("log")
    ax.set_xlabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _bars(ax: Any, trials: list[Trial]) -> None:
    names = [t.name for t in trials]
    ax.barh(range(len(trials)), [t.rsum or 0.0 for t in trials], color="C0")
    ax.set_yticks(range(len(trials)), names)
    ax.invert_yaxis()
    ax.set_xlabel("best val/rsum")
    ax.grid(alpha=0.3, axis="x")
