"""The learning-rate schedule of the training loop: a step decay, after an optional warm-up."""

from __future__ import annotations

import pytest

from shan.config import Config, OptimConfig
from shan.train.worker import lr_at


def config(**optim) -> Config:
    base = dict(lr=1e-3, lr_decay_epoch=3, lr_decay=0.1, warmup_steps=0)
    return Config(optim=OptimConfig(**{**base, **optim}))


def test_constant_before_the_decay_epoch_and_decayed_from_it():
    cfg = config()
    assert [lr_at(cfg, epoch, 1000) for epoch in range(6)] == pytest.approx(
        [1e-3, 1e-3, 1e-3, 1e-4, 1e-4, 1e-4], rel=1e-12
    )


def test_the_decay_is_applied_once_not_per_epoch():
    cfg = config(lr_decay_epoch=1, lr_decay=0.5)
    assert lr_at(cfg, 1, 0) == lr_at(cfg, 10, 0) == pytest.approx(5e-4)


def test_decay_from_the_first_epoch_and_no_decay():
    assert lr_at(config(lr_decay_epoch=0), 0, 0) == pytest.approx(1e-4)
    assert lr_at(config(lr_decay=1.0), 50, 0) == 1e-3


def test_the_step_does_not_matter_without_warm_up():
    cfg = config()
    assert {lr_at(cfg, 0, step) for step in (0, 1, 10, 10**6)} == {1e-3}


def test_linear_warm_up_over_warmup_steps():
    cfg = config(warmup_steps=4)
    got = [lr_at(cfg, 0, step) for step in range(7)]
    assert got == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)
    assert all(a < b for a, b in zip(got[:3], got[1:4]))  # rising, never above lr
    assert max(got) == 1e-3


def test_warm_up_counts_global_steps_across_epochs():
    cfg = config(warmup_steps=10, lr_decay_epoch=5)
    assert lr_at(cfg, 1, 4) == pytest.approx(5e-4)  # step 4 of the run: (4 + 1) / 10
    assert lr_at(cfg, 2, 10) == 1e-3


def test_warm_up_scales_the_decayed_rate():
    cfg = config(warmup_steps=4, lr_decay_epoch=0)
    assert lr_at(cfg, 0, 1) == pytest.approx(1e-4 * 2 / 4)
    assert lr_at(cfg, 0, 4) == pytest.approx(1e-4)


def test_the_first_step_is_never_zero():
    cfg = config(warmup_steps=1000)
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-6)
