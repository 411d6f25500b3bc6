"""The literal scorer (``shan.reference``, docs/model.md §3-§6 one pair at a time) against the
model's fast scorer, for every affinity and direction."""

import pytest
import torch

from shan.model import SCORES
from shan.reference import score_literal
from tests.helpers import encode, random_batch, tiny_model


@pytest.mark.parametrize("affinity", ["cosine", "dot"])
@pytest.mark.parametrize("direction", ["full", "i2t", "t2i"])
def test_fast_equals_literal(affinity, direction):
    model = tiny_model(affinity=affinity, direction=direction).float()
    batch = random_batch()
    batch = (batch[0].float(), *batch[1:])
    with torch.no_grad():
        im, cap = encode(model, *batch)
        fast = model.score(im, cap, block=2)
        lit = score_literal(model, im, cap)
    for key in SCORES:
        assert fast[key].shape == (3, 4)
        assert (fast[key] - lit[key]).abs().max().item() <= 1e-4, key
    # the steps are not trivially equal to each other
    assert (fast["l2l"] - fast["g2g"]).abs().max() > 1e-3
