"""MLflow metric names: ``val/rsum`` for the total score, ``val/l2l/rsum`` for a step's."""

from __future__ import annotations

from shan.metrics import SCORES


def flat_metrics(metrics: dict[str, dict], prefix: str = "val") -> dict[str, float]:
    """{"val/rsum": ..., "val/i2t_r1": ..., "val/l2l/rsum": ...}: the total at the top level."""
    out: dict[str, float] = {}
    for score, m in metrics.items():
        for k, v in m.items():
            out[f"{prefix}/{k}" if score == "total" else f"{prefix}/{score}/{k}"] = v
    return out


def unflat_metrics(flat: dict[str, float], prefix: str = "val") -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, v in flat.items():
        parts = key.split("/")
        if parts[0] != prefix:
            continue
        score, name = ("total", parts[1]) if len(parts) == 2 else (parts[1], parts[2])
        out.setdefault(score, {})[name] = v
    return {k: out[k] for k in SCORES if k in out}
