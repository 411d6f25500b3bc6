"""Scoring a request: images (region features) against captions (text) with a loaded checkpoint.

What the MLflow model (:mod:`shan.tracking.pyfunc`) serves, without MLflow: the request is
checked field by field (:class:`InputError` names the field), the captions are tokenized with
the checkpoint's vocabulary (cut at the config's ``data.max_words``, as the data sets are), and
the scores come from :func:`shan.scoring.score_matrix`, the scorer evaluation uses, with its
defaults (float32 on the CPU; bf16 autocast on CUDA, as evaluation scores by default).

A request is ``{"features": float32 (N, R, D), "counts": int (N,), "captions": str (M,)}``:
N images of at most R regions (image i has its first ``counts[i]`` rows), D the model's
``feature_dim``; the answer is ``{"total", "l2l", "g2l", "g2g"}``, each float32 (N, M).

Types are strict (a count 1.5, a caption that is an object, a feature that is a string are
refused), and a request is bounded before anything is allocated for it: at most
``SHAN_SERVE_MAX_SCORES`` scores (N x M, default 10,000,000) and ``SHAN_SERVE_MAX_FEATURES``
feature values (N x R x D, default 100,000,000), environment variables of the serving process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from shan.checkpoint import LoadedModel
from shan.model import SCORES

FIELDS = ("features", "counts", "captions")
# The most scores (images x captions) and feature values (N x R x D) one request may ask for;
# the environment variables set others.
MAX_SCORES = ("SHAN_SERVE_MAX_SCORES", 10_000_000)
MAX_FEATURES = ("SHAN_SERVE_MAX_FEATURES", 100_000_000)


class InputError(ValueError):
    """A request that cannot be scored; the message names the field."""


def limit(setting: tuple[str, int]) -> int:
    """The value of the environment variable ``setting[0]``, else its default ``setting[1]``;
    ValueError naming the variable when it is not a positive whole number."""
    name, default = setting
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isascii() or not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name}: expected a positive whole number, got {raw[:40]!r}")
    return int(raw)


def check_request(
    request: Mapping[str, Any], feature_dim: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(features float32 (N, R, D), counts int64 (N,), captions) of ``request``, checked: shapes
    and sizes (:data:`MAX_SCORES`, :data:`MAX_FEATURES`) first, then each value's type (an
    integer count, a string caption, number features), before anything is converted."""
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
    counts = _array("counts", request["counts"])
    captions = _array("captions", request["captions"])
    if captions.ndim != 1 or captions.shape[0] < 1:
        raise InputError(f"captions: expected a list of M >= 1 strings, got shape {captions.shape}")
    _check_sizes(features.shape, captions.shape[0])
    features = _numbers(features)
    counts = _counts(counts, features.shape)
    return features, counts, _captions(captions)


def _check_sizes(shape: tuple[int, ...], m: int) -> None:
    """Refuse a request over :data:`MAX_FEATURES` values or :data:`MAX_SCORES` scores."""
    most = limit(MAX_FEATURES)
    if math.prod(shape) > most:
        raise InputError(
            f"features: {math.prod(shape)} values (shape {shape}) are over the limit of {most} "
            f"a request may send ({MAX_FEATURES[0]})"
        )
    most = limit(MAX_SCORES)
    if shape[0] * m > most:
        raise InputError(
            f"captions: {m} captions x {shape[0]} images ask for {shape[0] * m} scores, over "
            f"the limit of {most} a request may ask for ({MAX_SCORES[0]})"
        )


def _array(name: str, value: Any) -> np.ndarray:
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as e:  # ragged nested lists
        raise InputError(f"{name}: not a rectangular array ({e})") from None


def _odd_type(values: np.ndarray, allowed: tuple[type, ...]) -> str | None:
    """The name of a type among an object array's values (JSON as the scoring server passes
    it) that is not one of ``allowed`` (booleans never are), else None."""
    for t in set(map(type, values.flat)):
        if not issubclass(t, allowed) or issubclass(t, (bool, np.bool_)):
            return t.__name__
    return None


def _numbers(features: np.ndarray) -> np.ndarray:
    """``features`` as float32: numbers only (no booleans, strings or complex), all finite."""
    if features.dtype == object:
        odd = _odd_type(features, (int, float, np.integer, np.floating))
        if odd:
            raise InputError(f"features: expected numbers, got a value of type {odd}")
    elif features.dtype.kind not in "iuf":
        raise InputError(f"features: expected float32 numbers, got {features.dtype}")
    try:
        out = features.astype(np.float32)
    except OverflowError:  # a Python int beyond any float
        raise InputError("features: holds a number too large for float32") from None
    if not np.isfinite(out).all():
        raise InputError("features: holds NaN or infinite values")
    return out


def _counts(counts: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    n, r = shape[0], shape[1]
    if counts.dtype == object and counts.shape == (n,):
        odd = _odd_type(counts, (int, np.integer))
        if odd:
            raise InputError(f"counts: expected {n} integers (one per image), got a {odd}")
        try:
            counts = counts.astype(np.int64)
        except OverflowError:  # a Python int beyond int64
            raise InputError("counts: holds an integer too large") from None
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
