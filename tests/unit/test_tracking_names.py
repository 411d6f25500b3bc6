"""MLflow metric names (``shan.tracking.names``): the total at the top level (``val/rsum``),
each step below it (``val/l2l/rsum``), and back."""

from __future__ import annotations

from shan.tracking.names import flat_metrics, unflat_metrics

METRICS = {
    "total": {"rsum": 300.0, "i2t_r1": 40.0},
    "l2l": {"rsum": 250.0},
    "g2g": {"rsum": 120.5},
}


def test_flat_names():
    flat = flat_metrics(METRICS)
    assert flat == {
        "val/rsum": 300.0,
        "val/i2t_r1": 40.0,
        "val/l2l/rsum": 250.0,
        "val/g2g/rsum": 120.5,
    }
    assert set(flat_metrics(METRICS, "test")) == {k.replace("val", "test") for k in flat}


def test_round_trip_in_score_order_ignoring_other_prefixes():
    flat = {**flat_metrics(METRICS), "train/loss": 1.0, "epoch": 3}
    back = unflat_metrics(flat)
    assert back == METRICS and list(back) == ["total", "l2l", "g2g"]
    assert unflat_metrics(flat_metrics(METRICS, "dev"), "dev") == METRICS
    assert unflat_metrics(flat, "test") == {}
