"""Scoring a request: images (region features) against captions (text) with a loaded checkpoint.

What the MLflow model (:mod:`shan.tracking.pyfunc`) serves, without MLflow: the request is
checked field by field (:class:`InputError` names the field), the captions are tokenized with
the checkpoint's vocabulary (cut at the config's ``data.max_words``, as the data sets are), and
the scores come from :func:`shan.scoring.score_matrix`, the scorer evaluation uses, with its
defaults (float32 on the CPU; bf16 autocast on CUDA, as evaluation scores by default).

A request is ``{"features": float32 (N, R, D), "counts": int (N,), "captions": str (M,)}``:
N images of at most R regions (image i has its first ``counts[i]`` rows), D the model's
``feature_dim``; the answer is ``{"total", "l2l", "g2l", "g2g"}``, each float32 (N, M).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shan.checkpoint import LoadedModel
from shan.model import SCORES

FIELDS = ("features", "counts", "captions")


class InputError(ValueError):
    """A request that cannot be scored; the message names the field."""


def check_request(
    request: Mapping[str, Any], feature_dim: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features float32 (N, R, D), counts int64 (N,), captions) of ``request``, checked."""
    if not isinstance(request, Mapping):
        raise InputError(f"expected an object with {', '.join(FIELDS)}, got {type(request)}")
    missing = [f for f in FIELDS if f not in request]
    if missing:
        raise InputError(f"{missing[0]}: missing (a request has {', '.join(FIELDS)})")
    features = _array("features", request["features"])
    if features.ndim != 3 or features.shape[2] != feature_dim or features.shape[0] < 1:
        raise InputError(
            f"features: expected shape (N, R, {feature_dim}) with N >= 1, got {features.shape}"
        )
    if not np.issubdtype(features.dtype, np.number) or features.dtype.kind == "c":
        raise InputError(f"features: expected float32 numbers, got {features.dtype}")
    features = features.astype(np.float32)
    if not np.isfinite(features).all():
        raise InputError("features: holds NaN or infinite values")
    counts = _counts(_array("counts", request["counts"]), features.shape)
    return features, counts, _captions(_array("captions", request["captions"]))


def _array(name: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise InputError(f"{name}: not a rectangular array ({e})") from None


def _counts(counts: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n, r = shape[0], shape[1]
    if counts.shape != (n,) or counts.dtype.kind not in "iu":
        raise InputError(
            f"counts: expected {n} integers (one per image), got shape {counts.shape} "
            f"of {counts.dtype}"
        )
    bad = np.flatnonzero((counts < 1) | (counts > r))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"counts: counts[{i}] = {counts[i]} is not in 1..{r} (regions given)")
    return counts.astype(np.int64)


def _captions(captions: np.ndarray) -> list[str]:
    if captions.ndim != 1 or captions.shape[0] < 1:
        raise InputError(f"captions: expected a list of M >= 1 strings, got shape {captions.shape}")
    out = []
    for i, c in enumerate(captions.tolist()):
        if isinstance(c, bytes):
            c = c.decode("utf-8", errors="replace")
        if not isinstance(c, str):
            raise InputError(f"captions: captions[{i}] is not a string ({type(c).__name__})")
        if not c.strip():
            raise InputError(f"captions: captions[{i}] is empty")
        out.append(c)
    return out


def score_request(
    loaded: LoadedModel, request: Mapping[str, Any], device: Any = "cpu"
) -> dict[str, np.ndarray]:
    """The scores of every image against every caption: {"total", "l2l", "g2l", "g2g"}, each
    float32 (N, M); InputError names the field of a request that cannot be scored."""
    import torch

    from shan.scoring import score_matrix

    cfg = loaded.config
    features, counts, captions = check_request(request, cfg.model.feature_dim)
    tokens = [loaded.vocab.encode(c, cfg.data.max_words) for c in captions]
    sims = score_matrix(loaded.model, features, counts, tokens, torch.device(device))
    return {k: np.ascontiguousarray(sims[k], dtype=np.float32) for k in SCORES}
