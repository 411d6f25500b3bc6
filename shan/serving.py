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

Search: with an index of the model loaded beside it (:func:`open_serving_index`, from
``SHAN_SERVE_INDEX``), a request whose ``features`` and ``counts`` are empty (``[]``, or JSON
null) searches the index for its ``captions`` (:func:`search_request`): each caption's ``rerank``
(K) nearest images by the first stage, reranked by the scorer, the best ``top`` (k) answered as
``{"image_ids": int64 (M, k), "total", "l2l", "g2l", "g2g": float32 (M, k)}`` (``top`` and
``rerank`` are the request's MLflow params; at most ``SHAN_SERVE_MAX_SCORES`` M x K scores).
The three inputs stay: MLflow's scoring server requires every input its signature names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from shan.checkpoint import LoadedModel
from shan.model import SCORES
from shan.rerank import DEFAULT_RERANK, DEFAULT_TOP

if TYPE_CHECKING:
    from shan.index import OpenIndex

FIELDS = ("features", "counts", "captions")
# The most scores (images x captions) and feature values (N x R x D) one request may ask for;
# the environment variables set others.
MAX_SCORES = ("SHAN_SERVE_MAX_SCORES", 10_000_000)
MAX_FEATURES = ("SHAN_SERVE_MAX_FEATURES", 100_000_000)
SERVE_INDEX = "SHAN_SERVE_INDEX"  # an index of the served model (shan index build): search


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


def answer(
    loaded: LoadedModel,
    index: OpenIndex | None,
    request: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
    device: Any = "cpu",
) -> dict[str, np.ndarray]:
    """What the served model answers: a search (:func:`search_request`) when ``request`` is one
    (:func:`is_search`) and an index is loaded, else the scores (:func:`score_request`)."""
    if is_search(request):
        if index is None:
            raise InputError(
                f"features: empty, and no index is loaded to search: serve the model with "
                f"{SERVE_INDEX}=DEST (an index of it: shan index build), or send features "
                "(N, R, D) and counts (N,) to score"
            )
        return search_request(loaded, index, request, params)
    return score_request(loaded, request, device)


def is_search(request: Mapping[str, Any]) -> bool:
    """Whether ``request`` asks to search the index: ``features`` and ``counts`` both empty
    (``[]`` or null) and ``captions`` given."""
    if not isinstance(request, Mapping) or "captions" not in request:
        return False
    return all(f in request and _empty(request[f]) for f in ("features", "counts"))


def _empty(value: Any) -> bool:
    if value is None:
        return True
    a = np.asarray(value, dtype=object) if isinstance(value, list) else value
    if not isinstance(a, np.ndarray):
        return False
    return a.size == 0 or (a.ndim == 0 and a.item() is None)


def _whole_param(name: str, value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name}: expected a whole number, got {value!r}"[:200])
    return int(value)


def search_request(
    loaded: LoadedModel,
    index: OpenIndex,
    request: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """The index searched for each caption of ``request`` (M captions; ``params``: ``top`` k,
    default 5, and ``rerank`` K, default 100, K >= k): {"image_ids": int64 (M, k), "total",
    "l2l", "g2l", "g2g": float32 (M, k)}, best first, k = min(top, N). A row an approximate
    index could not fill is id -1 with NaN scores. InputError names the field or param."""
    from shan.rerank import search_index

    params = params or {}
    top = _whole_param("top", params.get("top"), DEFAULT_TOP)
    rerank = _whole_param("rerank", params.get("rerank"), DEFAULT_RERANK)
    if top < 1:
        raise InputError(f"top: must be an integer >= 1, got {top}")
    if rerank < 1:
        raise InputError(f"rerank: must be an integer >= 1, got {rerank}")
    if rerank < top:
        raise InputError(
            f"rerank: {rerank} is smaller than top {top}: rerank at least as many candidates "
            "as matches asked for"
        )
    captions = _array("captions", request["captions"])
    if captions.ndim != 1 or captions.shape[0] < 1:
        raise InputError(f"captions: expected a list of M >= 1 strings, got shape {captions.shape}")
    most = limit(MAX_SCORES)
    if captions.shape[0] * min(rerank, len(index)) > most:
        raise InputError(
            f"captions: {captions.shape[0]} captions x rerank {rerank} ask for "
            f"{captions.shape[0] * min(rerank, len(index))} scores, over the limit of {most} a "
            f"request may ask for ({MAX_SCORES[0]})"
        )
    cfg = loaded.config
    tokens = [loaded.vocab.encode(c, cfg.data.max_words) for c in _captions(captions)]
    ranked = search_index(loaded.model, index, tokens, top=top, rerank=rerank)
    k = min(top, len(index))
    out = {"image_ids": np.full((len(ranked), k), -1, dtype=np.int64)}
    out.update({key: np.full((len(ranked), k), np.nan, dtype=np.float32) for key in SCORES})
    for q, r in enumerate(ranked):
        out["image_ids"][q, : len(r.rows)] = r.image_ids
        for key in SCORES:
            out[key][q, : len(r.rows)] = r.scores[key]
    return out


def open_serving_index(loaded: LoadedModel, checkpoint: str, dest: str) -> OpenIndex:
    """The index ``dest`` (``SHAN_SERVE_INDEX``) opened for the served model whose checkpoint
    folder is ``checkpoint``; JobError or CheckpointError (one line) when the model has no
    first-stage head or the index is not this model's."""
    from shan.checkpoint import require_first_stage
    from shan.fingerprint import file_digests
    from shan.index import open_index

    name = f"served from {checkpoint}"
    require_first_stage(loaded.model, name)
    return open_index(dest, model_files=file_digests(checkpoint), data_fingerprint=None, name=name)
