"""Hinge triplet loss with the hardest negative in the batch, both directions (docs/model.md §7).

The loss takes a score matrix, or the model's dict of them: rows are the batch's images, columns
its captions, and entry (i, i) pairs example i's image with its caption. Two examples with the
same image id are positives of each other, never negatives.

With several workers, each holds a share of the global batch. :class:`BatchLoss` is the module
DDP wraps: with ``loss.negatives_from: global`` it gathers every worker's embedded share, and
the worker's loss is its own images' and captions' terms of the global batch's loss
(:func:`share_triplet_loss`), so that the shares' losses sum to the one-worker loss; with
``local`` each worker's loss is the loss of its own share alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from shan.config import LossConfig

if TYPE_CHECKING:
    from shan.model import SHAN


def at_least_float32(scores: Tensor) -> Tensor:
    """Scores in float32, or float64 when they are (bf16 and float16 are too coarse for the
    sum over the batch)."""
    return scores if scores.dtype == torch.float64 else scores.float()


def hinge(scores: Tensor, true: Tensor, positive: Tensor, margin: float, negatives: str) -> Tensor:
    """One direction of the loss. scores: (R, C), each row an anchor against C candidates;
    true: (R,), each anchor's score with its own pair; positive: (R, C), the pairs that are
    never negatives -> scalar: ``sum_r max_{c neg} [m - true_r + S(r, c)]_+`` (``"all"``: the
    sum over every negative instead of the max)."""
    cost = (margin + scores - true[:, None]).clamp_min(0)  # (R, C)
    cost = cost.masked_fill(positive, 0.0)  # (R, C)
    if negatives == "hardest":
        return cost.max(dim=1).values.sum()
    if negatives == "all":
        return cost.sum()
    raise ValueError(f"negatives must be 'hardest' or 'all', got {negatives!r}")


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
    scores = at_least_float32(scores)  # (B, B)
    positive = image_ids[:, None] == image_ids[None, :]  # (B, B): same image
    diag = scores.diagonal()  # (B,)
    to_captions = hinge(scores, diag, positive, margin, negatives)  # image i vs wrong caption c
    to_images = hinge(scores.T, diag, positive.T, margin, negatives)  # caption c vs wrong image i
    return to_captions + to_images


def share_triplet_loss(
    rows: Tensor,
    cols: Tensor,
    image_ids: Tensor,
    start: int,
    *,
    margin: float = 0.2,
    negatives: str = "hardest",
) -> Tensor:
    """One share's part of :func:`triplet_loss` on a global batch of B examples.

    rows: (b, B), the share's images against every caption of the global batch; cols: (B, b),
    every image against the share's captions; image_ids: (B,), the global batch's; ``start``:
    the share's first example in the global batch -> scalar: the image-to-caption terms of the
    share's images plus the caption-to-image terms of its captions, each with its hardest
    negative in the whole global batch. Summed over the shares, this is ``triplet_loss`` of the
    (B, B) matrix.
    """
    b, full = rows.shape  # b, B
    if cols.shape != (full, b) or image_ids.shape != (full,) or not 0 <= start <= full - b:
        raise ValueError(
            f"expected rows (b, B), cols (B, b), image_ids (B,) and 0 <= start <= B - b, got "
            f"{tuple(rows.shape)}, {tuple(cols.shape)}, {tuple(image_ids.shape)} and {start}"
        )
    rows, cols = at_least_float32(rows), at_least_float32(cols)  # (b, B), (B, b)
    own = torch.arange(start, start + b, device=rows.device)  # (b,): the share's examples
    local = torch.arange(b, device=rows.device)  # (b,)
    positive = image_ids[own][:, None] == image_ids[None, :]  # (b, B): same image
    true_rows, true_cols = rows[local, own], cols[own, local]  # (b,), (b,): S(i, i), S(c, c)
    to_captions = hinge(rows, true_rows, positive, margin, negatives)  # the share's images
    to_images = hinge(cols.T, true_cols, positive, margin, negatives)  # the share's captions
    return to_captions + to_images


class TripletLoss:
    """The configured loss on the model's output dict (total score, and optionally each step)."""

    def __init__(self, cfg: LossConfig) -> None:
        cfg.validate()
        self.cfg = cfg

    def _keys(self) -> tuple[str, ...]:
        return ("total", "l2l", "g2l", "g2g") if self.cfg.per_step else ("total",)

    def __call__(self, scores: dict[str, Tensor] | Tensor, image_ids: Tensor) -> Tensor:
        """scores: (B, B) each, image_ids: (B,) -> scalar."""
        if isinstance(scores, Tensor):
            scores = {"total": scores}
        c = self.cfg
        losses = [triplet_loss(scores[k], image_ids, c.margin, c.negatives) for k in self._keys()]
        return sum(losses[1:], losses[0])

    def share(
        self, rows: dict[str, Tensor], cols: dict[str, Tensor], image_ids: Tensor, start: int
    ) -> Tensor:
        """rows: (b, B) each, cols: (B, b) each, image_ids: (B,) -> scalar: one share's part of
        the global batch's loss (:func:`share_triplet_loss`)."""
        c = self.cfg
        losses = [
            share_triplet_loss(
                rows[k], cols[k], image_ids, start, margin=c.margin, negatives=c.negatives
            )
            for k in self._keys()
        ]
        return sum(losses[1:], losses[0])


def workers() -> int:
    """Workers in the process group (1 when there is none)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherRows(torch.autograd.Function):
    """``all_gather`` along the first axis that autograd goes back through: the gradient of a
    worker's rows is the sum of every worker's gradient of them. Shares of unequal sizes are
    padded to the largest for the gather and cut back after it."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: tuple[int, ...]) -> Tensor:
        """x: (b, ...), sizes: every worker's b (rank order) -> (B, ...), B = sum(sizes)."""
        start = sum(sizes[: dist.get_rank()])
        ctx.own = slice(start, start + x.shape[0])
        return _gather(x.contiguous(), sizes)  # (B, ...)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        """grad: (B, ...) this worker's gradient of every row -> (b, ...)."""
        total = grad.clone(memory_format=torch.contiguous_format)  # (B, ...)
        dist.all_reduce(total)  # every worker's gradient of every row
        return total[ctx.own], None  # (b, ...): of this worker's rows


def _gather(x: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """x: (b, ...) contiguous on each worker, sizes: every worker's b -> (sum(sizes), ...)."""
    most = max(sizes)
    if x.shape[0] < most:  # all_gather takes equal shapes: pad, then cut each part back
        x = torch.cat([x, x.new_zeros((most - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(x) for _ in sizes]  # W x (most, ...)
    dist.all_gather(parts, x)
    if len(set(sizes)) == 1:
        return torch.cat(parts)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


def gather_rows(x: Tensor, sizes: tuple[int, ...] | None = None) -> Tensor:
    """x: (b, ...) on each of W workers -> (B, ...): every worker's rows, in rank order.

    ``sizes``: every worker's b (:func:`share_shapes`); None: all the same (this one's). The
    shares of an elastic group may differ by one (``OptimConfig.batch_shares``). Floating-point
    rows keep their gradient: it flows back to each row's owner, summed over the workers.
    Without a process group, ``x`` itself.
    """
    if workers() == 1:
        return x
    sizes = sizes or (x.shape[0],) * workers()
    if x.is_floating_point():
        return _GatherRows.apply(x, sizes)  # (B, ...)
    raw = x.to(torch.uint8) if x.dtype == torch.bool else x.contiguous()  # gloo has no bool
    return _gather(raw, sizes).to(x.dtype)  # (B, ...)


def share_shapes(b: int, n: int, device: torch.device) -> tuple[tuple[int, ...], int]:
    """Every worker's share size ``b`` (rank order) and the largest ``n`` (words of a share's
    longest caption), in one gather."""
    if workers() == 1:
        return (b,), n
    mine = torch.tensor([b, n], device=device)  # (2,)
    parts = [torch.empty_like(mine) for _ in range(workers())]
    dist.all_gather(parts, mine)
    return tuple(int(p[0]) for p in parts), max(int(p[1]) for p in parts)


class BatchLoss(nn.Module):
    """A training batch's loss as one module, the one DDP wraps, so that the encoders, the
    gathering and the scorer all run inside its forward.

    Each worker holds a share of b examples of the global batch of B examples (the shares
    may differ by one: ``OptimConfig.batch_shares``). With
    ``negatives_from="local"`` (or one worker) the share is scored against itself and its
    loss is :class:`TripletLoss` of its (b, b) matrices. With ``"global"`` the shares' region
    and word embeddings are gathered from every worker (the scorer's per-image and per-caption
    terms are then computed from them, which sends a fifth of the data); the share's images
    are scored against every caption (rows, (b, B)) and every image against the share's
    captions (columns, (B, b)), and the loss is :meth:`TripletLoss.share`: the shares' losses
    sum to the one-worker loss of the global batch.
    """

    def __init__(self, model: SHAN, cfg: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.loss = TripletLoss(cfg)
        self.first_stage_part: Tensor | None = None  # the last forward's first-stage loss

    def forward(
        self,
        features: Tensor,
        region_mask: Tensor | None,
        tokens: Tensor,
        lengths: Tensor,
        *,
        image_ids: Tensor,
        block: int | tuple[int, int] | None = None,
        checkpoint: bool = False,
    ) -> Tensor:
        """features: (b, k, F), region_mask: (b,) counts or (b, k) or None, tokens: (b, n),
        lengths: (b,), image_ids: (b,): this worker's share -> scalar: the share's loss."""
        if workers() == 1 or self.loss.cfg.negatives_from == "local":
            v, v_mask = self.model.embed_images(features, region_mask)  # (b, k, d), (b, k)
            t, t_mask = self.model.embed_captions(tokens, lengths)  # (b, n, d), (b, n)
            images = self.model.image_terms(v, v_mask)
            captions = self.model.caption_terms(t, t_mask)
            scores = self.model.score(images, captions, block=block, checkpoint=checkpoint)
            loss = self.loss(scores, image_ids)  # (b, b) each
            return loss + self.first_stage(v, v_mask, t, t_mask, image_ids)
        sizes, n = share_shapes(len(tokens), tokens.shape[1], tokens.device)  # n: longest
        tokens = F.pad(tokens, (0, n - tokens.shape[1]))  # (b, n): every share as wide
        v, v_mask = self.model.embed_images(features, region_mask)  # (b, k, d), (b, k)
        t, t_mask = self.model.embed_captions(tokens, lengths)  # (b, n, d), (b, n)
        first = self.first_stage(v, v_mask, t, t_mask, image_ids)  # the share's own pairs
        images = self.model.image_terms(gather_rows(v, sizes), gather_rows(v_mask, sizes))
        captions = self.model.caption_terms(gather_rows(t, sizes), gather_rows(t_mask, sizes))
        start = sum(sizes[: dist.get_rank()])  # the share's first example in the global batch
        own = slice(start, start + len(v))
        rows = self.model.score(images[own], captions, block=block, checkpoint=checkpoint)
        cols = self.model.score(images, captions[own], block=block, checkpoint=checkpoint)
        ids = gather_rows(image_ids, sizes)  # (B,)
        loss = self.loss.share(rows, cols, ids, start)  # (b, B), (B, b)
        return loss + first

    def first_stage(
        self, v: Tensor, v_mask: Tensor, t: Tensor, t_mask: Tensor, image_ids: Tensor
    ) -> Tensor:
        """The first stage's loss on the share's pairs (0 without a first stage), from the
        encodings detached: SHAN's gradients are the same with or without it."""
        head = self.model.first_stage
        if head is None:
            return v.new_zeros(())
        loss = first_stage_loss(
            head.images(v.detach(), v_mask),
            head.captions(t.detach(), t_mask),
            image_ids,
            self.loss.cfg.first_stage_temperature,
        )
        self.first_stage_part = loss.detach()  # logged apart (train/first_stage_loss)
        return loss


def first_stage_loss(images: Tensor, captions: Tensor, image_ids: Tensor, tau: float) -> Tensor:
    """Symmetric contrastive (InfoNCE) loss of a batch of pairs: images (B, D) and captions
    (B, D) unit vectors, pair i = (image of caption i, caption i); image_ids (B,): rows with
    the same image are all positives. Returns the mean over both directions, a scalar."""
    logits = at_least_float32(captions @ images.T) / tau  # (B, B): caption i, image j
    positive = image_ids[:, None] == image_ids[None, :]  # (B, B)
    t2i = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~positive, -1e9), 1)
    i2t = torch.logsumexp(logits.T, 1) - torch.logsumexp(logits.T.masked_fill(~positive, -1e9), 1)
    return 0.5 * (t2i.mean() + i2t.mean())  # ()
