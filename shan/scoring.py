"""Scoring whole splits with the model's one scorer (``SHAN.score``), chunk by chunk, their
recall metrics, the precision every scoring path uses (:func:`autocast`), and the one chunked
image encoder (:func:`image_chunks`, :func:`encode_images`) that validation, the evaluation's
tiles and the search's index share."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np
import torch

from shan.data.reader import SplitArrays, pad_tokens
from shan.metrics import format_table, recall_metrics
from shan.model import SCORES, SHAN, EncodedCaptions, EncodedImages

IMAGE_FIELDS = tuple(f.name for f in dataclasses.fields(EncodedImages))  # v, mask, vp, vg, pv


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA when asked; nothing on CPU."""
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def image_chunks(
    model: SHAN,
    features: np.ndarray,
    num_regions: np.ndarray,
    device: torch.device,
    *,
    chunk: int = 256,
    bf16: bool = True,
) -> Iterator[tuple[slice, EncodedImages]]:
    """features (N, R, F), num_regions (N,) -> for each run of ``chunk`` images, its rows and
    the images encoded on ``device`` (:meth:`SHAN.encode_images`: v, vp, pv (B, R, d), vg
    (B, R, 2d), mask (B, R) bool), without gradients and at :func:`autocast` precision. The
    model is put in eval mode. Only one chunk is in memory at a time."""
    model.eval()
    for i0 in range(0, len(features), chunk):
        feats = torch.from_numpy(np.array(features[i0 : i0 + chunk], dtype=np.float32))
        counts = torch.from_numpy(np.array(num_regions[i0 : i0 + chunk]))
        with torch.no_grad(), autocast(device, bf16):
            images = model.encode_images(feats.to(device), counts.to(device))
        yield slice(i0, i0 + len(feats)), images


def encode_images(
    model: SHAN,
    features: np.ndarray,
    num_regions: np.ndarray,
    device: torch.device,
    *,
    chunk: int = 256,
    bf16: bool = False,
    report: Callable[[int], None] | None = None,
) -> EncodedImages:
    """features (N, R, F), num_regions (N,) -> the N images encoded (:func:`image_chunks`),
    on CPU: v, vp, pv (N, R, d), vg (N, R, 2d) float32, mask (N, R) bool. ``report`` gets each
    chunk's size as it is done."""
    parts: list[EncodedImages] = []
    for _, images in image_chunks(model, features, num_regions, device, chunk=chunk, bf16=bf16):
        parts.append(EncodedImages(*(_cpu32(getattr(images, f)) for f in IMAGE_FIELDS)))
        if report is not None:
            report(len(images))
    if len(parts) == 1:
        return parts[0]
    return EncodedImages(*(torch.cat([getattr(p, f) for p in parts]) for f in IMAGE_FIELDS))


def _cpu32(x: torch.Tensor) -> torch.Tensor:
    return x.cpu() if x.dtype == torch.bool else x.float().cpu()


@torch.no_grad()
def image_vectors(
    model: SHAN,
    features: np.ndarray,
    num_regions: np.ndarray,
    device: torch.device,
    *,
    chunk: int = 256,
    bf16: bool = False,
) -> np.ndarray:
    """features (N, R, F), num_regions (N,) -> (N, D) float32 first-stage unit vectors
    (:meth:`SHAN.image_vectors`), chunk by chunk (:func:`image_chunks`)."""
    out = np.empty((len(features), _first_stage_dim(model)), dtype=np.float32)
    for rows, images in image_chunks(model, features, num_regions, device, chunk=chunk, bf16=bf16):
        with autocast(device, bf16):
            out[rows] = model.image_vectors(images).float().cpu().numpy()
    return out


@torch.no_grad()
def caption_vectors(
    model: SHAN, tokens: list[list[int]], device: torch.device, *, chunk: int = 1024
) -> np.ndarray:
    """C token lists -> (C, D) float32 first-stage unit vectors (:meth:`SHAN.caption_vectors`),
    in chunks of similar length."""
    model.eval()
    out = np.empty((len(tokens), _first_stage_dim(model)), dtype=np.float32)
    order = np.argsort([len(t) for t in tokens], kind="stable")
    for c0 in range(0, len(tokens), chunk):
        cols = order[c0 : c0 + chunk]
        toks, lens = pad_tokens([tokens[j] for j in cols])
        caps = model.encode_captions(toks.to(device), lens.to(device))
        out[cols] = model.caption_vectors(caps).float().cpu().numpy()
    return out


def _first_stage_dim(model: SHAN) -> int:
    if model.first_stage is None:
        raise ValueError("this model has no first stage (model.first_stage_dim is 0)")
    return model.cfg.first_stage_dim


@torch.no_grad()
def rerank_scores(
    model: SHAN,
    images: EncodedImages,
    captions: EncodedCaptions,
    candidates: np.ndarray,
    *,
    by: str = "caption",
) -> dict[str, np.ndarray]:
    """The model's one scorer on each query's candidates only.

    ``by="caption"``: query q is ``captions[q]`` and ``candidates[q]`` are rows of ``images``;
    ``by="image"``: query q is ``images[q]`` and ``candidates[q]`` are rows of ``captions``.
    candidates (Q, K) int -> {"total", "l2l", "g2l", "g2g"}, each (Q, K) float32: the entries
    :func:`score_matrix` gives those pairs.
    """
    model.eval()
    q_n, k = candidates.shape
    out = {key: np.empty((q_n, k), dtype=np.float32) for key in SCORES}
    for q in range(q_n):
        rows = torch.from_numpy(np.asarray(candidates[q], dtype=np.int64))
        if by == "caption":
            sims = model.score(images[rows], captions[q : q + 1], block=(max(k, 1), 1))  # (K, 1)
        else:
            sims = model.score(images[q : q + 1], captions[rows], block=(1, max(k, 1)))  # (1, K)
        for key in SCORES:
            out[key][q] = sims[key].float().reshape(-1).cpu().numpy()
    return out


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
    n, c = len(features), len(tokens)
    out = {k: np.empty((n, c), dtype=np.float32) for k in SCORES}
    order = np.argsort([len(t) for t in tokens], kind="stable")
    chunks = image_chunks(model, features, num_regions, device, chunk=image_chunk, bf16=bf16)
    for rows, images in chunks:
        with autocast(device, bf16):
            for c0 in range(0, c, caption_chunk):
                cols = order[c0 : c0 + caption_chunk]
                toks, lens = pad_tokens([tokens[j] for j in cols])
                caps = model.encode_captions(toks.to(device), lens.to(device))
                sims = model.score(images, caps, block=block)
                for key in SCORES:
                    out[key][rows, cols] = sims[key].float().cpu().numpy()
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


__all__ = [
    "autocast",
    "caption_vectors",
    "encode_images",
    "evaluate_split",
    "format_table",
    "image_chunks",
    "image_vectors",
    "rerank_scores",
    "score_matrix",
    "split_metrics",
]
