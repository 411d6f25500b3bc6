import pytest
import torch

from shan.config import LossConfig
from shan.loss import TripletLoss, triplet_loss


def test_hardest_negative_hand_computed():
    s = torch.tensor([[0.9, 0.3, 0.8], [0.1, 0.5, 0.6], [0.2, 0.4, 0.7]])
    # image rows: i0 hardest wrong caption 0.8 -> [0.2 - 0.9 + 0.8]+ = 0.1
    #             i1 hardest 0.6 -> 0.2 - 0.5 + 0.6 = 0.3 ; i2 hardest 0.4 -> 0.2 - 0.7 + 0.4 = 0
    # caption cols: c0 hardest image 0.2 -> 0.2 - 0.9 + 0.2 = 0 ; c1 0.4 -> 0.2 - 0.5 + 0.4 = 0.1
    #               c2 0.8 -> 0.2 - 0.7 + 0.8 = 0.3
    loss = triplet_loss(s, torch.tensor([0, 1, 2]), margin=0.2)
    assert loss.item() == pytest.approx(0.1 + 0.3 + 0.0 + 0.0 + 0.1 + 0.3)


def test_two_captions_of_one_image_are_not_negatives():
    # examples 0 and 1 share image 7; their cross entries are positives, however high.
    s = torch.tensor([[0.9, 0.95, 0.1], [0.95, 0.9, 0.2], [0.3, 0.1, 0.8]])
    ids = torch.tensor([7, 7, 3])
    # row 0: negatives {c2: 0.1} -> [0.2 - 0.9 + 0.1]+ = 0 ; row 1: {0.2} -> 0 ;
    # row 2: {0.3, 0.1} -> 0.2 - 0.8 + 0.3 = 0 ... all zero except none
    # col 0: negatives {i2: 0.3} -> 0 ; col 1: {0.1} -> 0 ; col 2: {0.1, 0.2} -> 0.2 - 0.8 + 0.2 = 0
    assert triplet_loss(s, ids, margin=0.2).item() == pytest.approx(0.0)
    # the same matrix with distinct ids counts 0.95 as a negative
    distinct = triplet_loss(s, torch.tensor([0, 1, 2]), margin=0.2).item()
    # row0: 0.2-0.9+0.95=0.25 ; row1: 0.2-0.9+0.95=0.25 ; row2: 0.2-0.8+0.3=0 ;
    # col0: 0.25 ; col1: 0.25 ; col2: 0.2-0.8+0.2=0
    assert distinct == pytest.approx(1.0)


def test_all_negatives_sums_every_violation():
    s = torch.tensor([[0.5, 0.4], [0.45, 0.5]])
    # rows: [0.2-0.5+0.4]=0.1, [0.2-0.5+0.45]=0.15 ; cols: [0.2-0.5+0.45]=0.15, [0.2-0.5+0.4]=0.1
    loss = triplet_loss(s, torch.tensor([0, 1]), margin=0.2, negatives="all")
    assert loss.item() == pytest.approx(0.5)


def test_per_step_adds_each_step():
    s = torch.tensor([[0.5, 0.4], [0.45, 0.5]])
    zero = torch.zeros(2, 2) + torch.eye(2)
    scores = {"total": s, "l2l": s, "g2l": zero, "g2g": zero}
    ids = torch.tensor([0, 1])
    only_total = TripletLoss(LossConfig())(scores, ids).item()
    with_steps = TripletLoss(LossConfig(per_step=True))(scores, ids).item()
    assert with_steps == pytest.approx(2 * only_total)


def test_shape_errors():
    with pytest.raises(ValueError, match="expected scores"):
        triplet_loss(torch.zeros(2, 3), torch.tensor([0, 1]))
