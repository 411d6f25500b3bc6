"""shan.fingerprint.scorer_digest: equal for checkpoints that score alike (another first stage),
different when a SHAN weight, a scoring key or the caption cut differs."""

from __future__ import annotations

import torch

from shan.fingerprint import scorer_digest

KEYS = {"model.d": 8, "model.lambda_l2l": 4.0, "model.first_stage_dim": 8}


def state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "l2l.weight": torch.randn(4, 3, generator=g),
        "g2g.bias": torch.randn(4, generator=g),
        "first_stage.image.weight": torch.randn(2, 4, generator=g),
    }


def test_another_first_stage_scores_alike():
    other = state()
    other["first_stage.image.weight"] += 1
    keys = {**KEYS, "model.first_stage_dim": 16, "model.first_stage_pool": "max"}
    assert scorer_digest(other, keys, 30) == scorer_digest(state(), KEYS, 30)
    del other["first_stage.image.weight"]  # no first stage at all
    assert scorer_digest(other, KEYS, 30) == scorer_digest(state(), KEYS, 30)


def test_a_shan_weight_a_key_or_the_cut_changes_it():
    base = scorer_digest(state(), KEYS, 30)
    changed = state()
    changed["g2g.bias"][0] += 1e-6
    assert scorer_digest(changed, KEYS, 30) != base
    assert scorer_digest(state(), {**KEYS, "model.lambda_l2l": 5.0}, 30) != base
    assert scorer_digest(state(), KEYS, 31) != base
    halves = {k: v.half() for k, v in state().items()}
    assert scorer_digest(halves, KEYS, 30) != base
