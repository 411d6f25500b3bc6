"""Retrieve, then rerank: sentences against an image index (:mod:`shan.index`).

Each query's first-stage vector (:meth:`SHAN.caption_vectors`) finds its ``rerank`` (K) nearest
images in the index; those K images' stored fragments are read (only theirs) and scored with the
model's one scorer on candidates (:func:`shan.scoring.rerank_scores`); the ``top`` (k) of them
by the total are kept, equal totals in the index's row order, as exhaustive search orders them.
What ``shan search --index`` and the served MLflow model answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shan.data.reader import pad_tokens
from shan.model import SCORES
from shan.scoring import rerank_scores

if TYPE_CHECKING:
    from shan.index import OpenIndex
    from shan.model import SHAN


DEFAULT_TOP = 5  # matches per query (shan search -k, the served search's top)
DEFAULT_RERANK = 100  # K: candidates reranked per query when none is given


@dataclass
class Ranked:
    """One query's best images, best first: ``rows`` (k,) rows of the index, ``image_ids``
    (k,) and ``scores`` {"total", "l2l", "g2l", "g2g"}, each (k,) float32."""

    rows: np.ndarray
    image_ids: np.ndarray
    scores: dict[str, np.ndarray]


def rerank_problems(top: int, rerank: int | None, prefix: str = "--") -> list[str]:
    """Why K = ``rerank`` cannot rerank for the best ``top`` (k): K must be a whole number >= 1
    and >= k (the rerank ranks only its K candidates). Empty when it can."""
    if rerank is None:
        return []
    if not isinstance(rerank, int) or isinstance(rerank, bool) or rerank < 1:
        return [f"{prefix}rerank must be an integer >= 1, got {rerank!r}"]
    if isinstance(top, int) and rerank < top:
        return [
            f"{prefix}rerank {rerank} is smaller than {prefix}top {top}: rerank at least as many "
            "candidates as matches asked for"
        ]
    return []


@torch.no_grad()
def search_index(
    model: SHAN, index: OpenIndex, tokens: list[list[int]], *, top: int, rerank: int
) -> list[Ranked]:
    """Q token lists -> per query its ``top`` best images among the index's ``rerank`` nearest
    (K > N searches all N). The model must have a first stage and be the index's model."""
    model.eval()
    device = next(model.parameters()).device
    toks, lens = pad_tokens(tokens)
    captions = model.encode_captions(toks.to(device), lens.to(device))
    vectors = model.caption_vectors(captions).float().cpu().numpy()  # (Q, D)
    candidates, _ = index.search(vectors, rerank)  # (Q, K') rows, -1 where FAISS found fewer
    wanted = np.unique(candidates[candidates >= 0])
    images = index.images(model, wanted)  # only the candidates' fragments are read
    out = []
    for q in range(len(tokens)):
        rows = candidates[q][candidates[q] >= 0]
        local = np.searchsorted(wanted, rows)[None, :]
        scores = rerank_scores(model, images, captions[q : q + 1], local, by="caption")
        out.append(_best(rows, {k: v[0] for k, v in scores.items()}, index.image_ids, top))
    return out


def _best(rows: np.ndarray, scores: dict[str, np.ndarray], image_ids: Any, top: int) -> Ranked:
    """The ``top`` of ``rows`` by the total, highest first, equal totals lower row first."""
    order = np.lexsort((rows, -scores["total"]))[:top]
    best = rows[order]
    return Ranked(
        best,
        np.asarray(image_ids[best], dtype=np.int64),
        {k: np.ascontiguousarray(scores[k][order], dtype=np.float32) for k in SCORES},
    )


__all__ = ["DEFAULT_RERANK", "DEFAULT_TOP", "Ranked", "rerank_problems", "search_index"]
