"""Scoring whole splits with the model's one scorer (``SHAN.score``), chunk by chunk, their
recall metrics, and the precision every scoring path uses (:func:`autocast`)."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from shan.data.reader import SplitArrays, pad_tokens
from shan.metrics import format_table, recall_metrics
from shan.model import SCORES, SHAN


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA when asked; nothing on CPU."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def score_matrix(
    model: SHAN,
    features: np.ndarray,
    num_regions: np.ndarray,
    tokens: list[list[int]],
    device: torch.device,
    *,
    image_chunk: int = 256,
    caption_chunk: int = 1024,
    block: int | None = None,
    bf16: bool = True,
) -> dict[str, np.ndarray]:
    """Every image (N, R, F) against every caption -> {"total", "l2l", "g2l", "g2g"}: (N, C).

    Captions are encoded in chunks of similar length; memory holds one image chunk and one
    caption chunk, not the split.
    """
    model.eval()
    n, c = len(features), len(tokens)
    out = {k: np.empty((n, c), dtype=np.float32) for k in SCORES}
    order = np.argsort([len(t) for t in tokens], kind="stable")
    with autocast(device, bf16):
        for i0 in range(0, n, image_chunk):
            feats = torch.from_numpy(np.array(features[i0 : i0 + image_chunk]))  # a writable copy
            counts = torch.from_numpy(np.array(num_regions[i0 : i0 + image_chunk]))
            images = model.encode_images(feats.to(device).float(), counts.to(device))
            for c0 in range(0, c, caption_chunk):
                cols = order[c0 : c0 + caption_chunk]
                toks, lens = pad_tokens([tokens[j] for j in cols])
                caps = model.encode_captions(toks.to(device), lens.to(device))
                sims = model.score(images, caps, block=block)
                for key in SCORES:
                    out[key][i0 : i0 + len(feats), cols] = sims[key].float().cpu().numpy()
    return out


def split_metrics(
    sims: dict[str, np.ndarray], caption_image: np.ndarray
) -> dict[str, dict[str, float]]:
    """Recall metrics of each score matrix: {"total": {...}, "l2l": {...}, ...}."""
    return {k: recall_metrics(v, caption_image) for k, v in sims.items()}


def evaluate_split(
    model: SHAN, data: SplitArrays, device: torch.device, **kw: Any
) -> dict[str, dict[str, float]]:
    """Score a whole split and return its metrics per score."""
    sims = score_matrix(model, data.features, data.num_regions, data.tokens, device, **kw)
    return split_metrics(sims, data.caption_image)


__all__ = ["autocast", "evaluate_split", "format_table", "score_matrix", "split_metrics"]
