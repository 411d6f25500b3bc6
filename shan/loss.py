"""Hinge triplet loss with the hardest negative in the batch, both directions (docs/model.md §7).

The loss takes a score matrix, or the model's dict of them: rows are the batch's images, columns
its captions, and entry (i, i) pairs example i's image with its caption. Two examples with the
same image id are positives of each other, never negatives.
"""

from __future__ import annotations

from torch import Tensor

from shan.config import LossConfig


def triplet_loss(
    scores: Tensor, image_ids: Tensor, margin: float = 0.2, negatives: str = "hardest"
) -> Tensor:
    """scores: (B, B), image_ids: (B,) -> scalar.

    ``sum_i [m - S(i,i) + max_{c neg} S(i,c)]_+ + sum_c [m - S(c,c) + max_{i neg} S(i,c)]_+``;
    with ``negatives="all"`` the max becomes a sum over every negative.
    """
    b = scores.shape[0]
    if scores.shape != (b, b) or image_ids.shape != (b,):
        raise ValueError(
            f"expected scores (B, B) and image_ids (B,), got {tuple(scores.shape)} "
            f"and {tuple(image_ids.shape)}"
        )
    scores = scores.float()
    positive = image_ids[:, None] == image_ids[None, :]  # (B, B): same image
    diag = scores.diagonal()
    cost_caption = (margin + scores - diag[:, None]).clamp_min(0)  # image i vs wrong caption c
    cost_image = (margin + scores - diag[None, :]).clamp_min(0)  # caption c vs wrong image i
    cost_caption = cost_caption.masked_fill(positive, 0.0)
    cost_image = cost_image.masked_fill(positive, 0.0)
    if negatives == "hardest":
        return cost_caption.max(dim=1).values.sum() + cost_image.max(dim=0).values.sum()
    if negatives == "all":
        return cost_caption.sum() + cost_image.sum()
    raise ValueError(f"negatives must be 'hardest' or 'all', got {negatives!r}")


class TripletLoss:
    """The configured loss on the model's output dict (total score, and optionally each step)."""

    def __init__(self, cfg: LossConfig) -> None:
        cfg.validate()
        self.cfg = cfg

    def __call__(self, scores: dict[str, Tensor] | Tensor, image_ids: Tensor) -> Tensor:
        if isinstance(scores, Tensor):
            scores = {"total": scores}
        c = self.cfg
        loss = triplet_loss(scores["total"], image_ids, c.margin, c.negatives)
        if c.per_step:
            for step in ("l2l", "g2l", "g2g"):
                loss = loss + triplet_loss(scores[step], image_ids, c.margin, c.negatives)
        return loss
