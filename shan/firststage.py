"""The first stage distilled afterwards: a fresh :class:`~shan.model.FirstStage` fitted to a
trained SHAN's frozen encoders (``shan index head``).

The head trained beside SHAN (``model.first_stage_dim``) chases encodings that move while
SHAN learns; fitted afterwards to the final ones it finds more of each query's true match
among its candidates (benchmarks/results/first_stage_cpu.txt: on the demo test split, caption
queries' R@100 with the attention-pool head 90.1 beside SHAN, 93.7 after 5 epochs of 128 pairs;
with the max-pool head, the default, 98.8 after the same fit). SHAN's weights are not touched:
only the head's change, so the step scores stay what they were.

Shapes: N images of k regions, C captions of n words, d SHAN's size, D the head's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from shan.data.reader import SplitArrays, pad_tokens
from shan.loss import first_stage_loss
from shan.model import FIRST_STAGE_SEED, SHAN, FirstStage


@dataclass
class FitOptions:
    """How the head is fitted: ``epochs`` passes over the captions in shuffled batches of
    ``batch`` pairs, Adam at ``lr``, the contrastive loss at temperature ``tau``; ``pool`` the
    head's kind (:class:`~shan.model.FirstStage`)."""

    epochs: int = 5
    batch: int = 128
    lr: float = 1e-3
    tau: float = 0.05
    seed: int = FIRST_STAGE_SEED
    pool: str = "max"


def fit_first_stage(
    model: SHAN,
    split: SplitArrays,
    dim: int,
    opts: FitOptions | None = None,
    report: Callable[[int, float], None] | None = None,
) -> FirstStage:
    """A new head of size ``dim`` and kind ``opts.pool`` fitted on ``split`` (the train split)
    to ``model``'s frozen encoders, on the model's device; ``report(epoch, mean loss)`` after
    each epoch. The model itself is left as it was (its own head included)."""
    opts = opts or FitOptions()
    device = next(model.parameters()).device
    cfg = model.cfg
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(opts.seed)
        head = FirstStage(cfg.d, cfg.d_a, dim, opts.pool).to(device)
    optimizer = torch.optim.Adam(head.parameters(), lr=opts.lr)
    rng = np.random.default_rng(opts.seed)
    model.eval()
    for epoch in range(opts.epochs):
        losses = []
        for rows in caption_batches(len(split.caption_image), opts.batch, rng):
            v, v_mask, t, t_mask, images = encoded_batch(model, split, rows, device)
            loss = first_stage_loss(head.images(v, v_mask), head.captions(t, t_mask),
                                    images, opts.tau)  # fmt: skip
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        if report is not None:
            report(epoch + 1, float(np.mean(losses)) if losses else float("nan"))
    return head.eval()


def caption_batches(n_captions: int, batch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Shuffled caption rows in batches of ``batch`` (B,); a last short batch of at least 2
    is kept (the loss needs a negative)."""
    order = rng.permutation(n_captions)
    parts = [order[b0 : b0 + batch] for b0 in range(0, n_captions, batch)]
    return [p for p in parts if len(p) >= 2]


@torch.no_grad()
def encoded_batch(
    model: SHAN, split: SplitArrays, rows: np.ndarray, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Captions ``rows`` (B,) and their images through the frozen encoders: v (B, k, d),
    v_mask (B, k), t (B, n, d), t_mask (B, n), and each pair's image row (B,)."""
    images = split.caption_image[rows]  # (B,)
    feats = torch.from_numpy(np.array(split.features[images], dtype=np.float32))
    counts = torch.from_numpy(np.array(split.num_regions[images]))
    v, v_mask = model.embed_images(feats.to(device), counts.to(device))  # (B, k, d), (B, k)
    tokens, lengths = pad_tokens([split.tokens[r] for r in rows])  # (B, n), (B,)
    t, t_mask = model.embed_captions(tokens.to(device), lengths.to(device))  # (B, n, d)
    return v, v_mask, t, t_mask, torch.from_numpy(images).to(device)


def with_head(model: SHAN, head: FirstStage) -> dict[str, torch.Tensor]:
    """``model``'s state dict with ``head`` as its first stage (CPU tensors): the weights of a
    checkpoint whose config has ``model.first_stage_dim`` = the head's size."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not k.startswith("first_stage.")}
    state.update({f"first_stage.{k}": v.detach().cpu() for k, v in head.state_dict().items()})
    return state


__all__ = ["FitOptions", "caption_batches", "encoded_batch", "fit_first_stage", "with_head"]
