"""Recall metrics of the SCAN evaluation protocol (docs/model.md §9).

``sims`` is (images, captions); ``caption_image[c]`` is the row of caption c's image. Ranks are
0-based counts of the items scored above the ground truth, ties counted above (pessimistic):

* image-to-text: the number of other images' captions scoring >= the image's best
  ground-truth caption (its best-ranked ground truth);
* text-to-image: the number of other images scoring >= the caption's image.

Recalls are percentages; ``medr`` and ``meanr`` are 1-based, as SCAN prints them.
"""

from __future__ import annotations

import numpy as np

STEPS = ("l2l", "g2l", "g2g")  # the alignment steps, named as in the paper
SCORES = ("total", *STEPS)  # the keys of every score dict and matrix: the total, then each step

KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
    "rsum", "i2t_medr", "t2i_medr", "i2t_meanr", "t2i_meanr",
)  # fmt: skip


def _check(sims: np.ndarray, caption_image: np.ndarray) -> None:
    if sims.ndim != 2 or caption_image.shape != (sims.shape[1],):
        raise ValueError(
            f"sims must be (images, captions) and caption_image (captions,); got "
            f"{sims.shape} and {caption_image.shape}"
        )
    if caption_image.min(initial=0) < 0 or caption_image.max(initial=0) >= sims.shape[0]:
        raise ValueError("caption_image holds a row outside the matrix")
    counts = np.bincount(caption_image, minlength=sims.shape[0])
    if (counts == 0).any():
        raise ValueError(f"image row {int(np.argmin(counts))} has no caption")


def _checked(sims: np.ndarray, caption_image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sims as float32 (Ni, Nc), caption_image (Nc,)), checked to fit each other."""
    sims, caption_image = np.asarray(sims, dtype=np.float32), np.asarray(caption_image)
    _check(sims, caption_image)
    return sims, caption_image


def i2t_ranks(sims: np.ndarray, caption_image: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """(images,) 0-based rank of each image's best ground-truth caption."""
    sims, caption_image = _checked(sims, caption_image)
    ranks = np.empty(sims.shape[0], dtype=np.int64)
    for r0 in range(0, sims.shape[0], chunk):
        block = sims[r0 : r0 + chunk]  # (b, Nc)
        rows = np.arange(r0, r0 + block.shape[0])
        gt = caption_image[None, :] == rows[:, None]  # (b, Nc)
        best = np.where(gt, block, -np.inf).max(axis=1)  # (b,)
        ranks[r0 : r0 + block.shape[0]] = ((block >= best[:, None]) & ~gt).sum(axis=1)
    return ranks


def t2i_ranks(sims: np.ndarray, caption_image: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """(captions,) 0-based rank of each caption's image."""
    sims, caption_image = _checked(sims, caption_image)
    ranks = np.empty(sims.shape[1], dtype=np.int64)
    for c0 in range(0, sims.shape[1], chunk):
        block = sims[:, c0 : c0 + chunk]  # (Ni, b)
        gt_rows = caption_image[c0 : c0 + block.shape[1]]
        gt = block[gt_rows, np.arange(block.shape[1])]  # (b,)
        ranks[c0 : c0 + block.shape[1]] = (block >= gt[None, :]).sum(axis=0) - 1
    return ranks


def recall_metrics(sims: np.ndarray, caption_image: np.ndarray) -> dict[str, float]:
    """R@1/5/10 both ways (percent), rsum, median and mean rank (1-based)."""
    return ranks_metrics(i2t_ranks(sims, caption_image), t2i_ranks(sims, caption_image))


def ranks_metrics(
    ri: np.ndarray, rt: np.ndarray, found: tuple[np.ndarray, np.ndarray] | None = None
) -> dict[str, float]:
    """The metrics of 0-based ranks: ri (images,) image-to-text, rt (captions,) text-to-image.
    ``found``: (images,), (captions,) bool, False where the ground truth was not ranked at all
    (a miss at every k, whatever its rank says)."""
    out: dict[str, float] = {}
    hit = found or (np.ones(len(ri), bool), np.ones(len(rt), bool))
    for name, r, h in (("i2t", ri, hit[0]), ("t2i", rt, hit[1])):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * float(((r < k) & h).mean())
    out["rsum"] = sum(out[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10))
    for name, r in (("i2t", ri), ("t2i", rt)):
        out[f"{name}_medr"] = float(np.floor(np.median(r)) + 1)
        out[f"{name}_meanr"] = float(r.mean() + 1)
    return {k: out[k] for k in KEYS}


def fold_metrics(
    sims: np.ndarray, caption_image: np.ndarray, folds: int = 5, fold_size: int = 1000
) -> dict[str, float]:
    """COCO 1K: the mean of :func:`recall_metrics` over ``folds`` blocks of ``fold_size`` images
    (rows ``f*fold_size .. (f+1)*fold_size`` and their captions)."""
    caption_image = np.asarray(caption_image)
    if sims.shape[0] < folds * fold_size:
        raise ValueError(
            f"{folds} folds of {fold_size} images need {folds * fold_size} images, "
            f"the matrix has {sims.shape[0]}"
        )
    results = []
    for f in range(folds):
        r0, r1 = f * fold_size, (f + 1) * fold_size
        cols = np.flatnonzero((caption_image >= r0) & (caption_image < r1))
        results.append(recall_metrics(sims[r0:r1][:, cols], caption_image[cols] - r0))
    return {k: float(np.mean([r[k] for r in results])) for k in KEYS}


def format_table(metrics: dict[str, dict[str, float]]) -> str:
    """A Markdown recall table, one row per score (``total``, ``l2l``, ...)."""
    head = "| score | i2t R@1 | R@5 | R@10 | t2i R@1 | R@5 | R@10 | rsum | i2t medr | t2i medr |"
    lines = [head, "|" + "---|" * 10]
    for name, m in metrics.items():
        vals = [m[k] for k in KEYS[:7]] + [m["i2t_medr"], m["t2i_medr"]]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return "\n".join(lines)


def sparse_ranks(candidates: np.ndarray, scores: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Each query's 0-based rank among its own candidates only.

    candidates (Q, K) int: the rows each query was scored against; scores (Q, K) their scores;
    truth (Q, T) bool: which candidates are a ground truth of the query. The rank of a query is
    the number of non-truth candidates scoring >= its best-scoring truth candidate (ties
    counted above, as :func:`i2t_ranks`); a query with no truth among its candidates is ranked
    K (below every candidate; :func:`sparse_recall_metrics` counts it a miss at every k).
    """
    scores = np.asarray(scores, dtype=np.float32)
    if candidates.shape != scores.shape or truth.shape != scores.shape:
        raise ValueError(
            f"candidates, scores and truth must have one shape (Q, K); got {candidates.shape}, "
            f"{scores.shape} and {truth.shape}"
        )
    best = np.where(truth, scores, -np.inf).max(axis=1, initial=-np.inf)  # (Q,)
    ranks = ((scores >= best[:, None]) & ~truth).sum(axis=1)
    return np.where(truth.any(axis=1), ranks, scores.shape[1]).astype(np.int64)


def sparse_recall_metrics(
    t2i: tuple[np.ndarray, np.ndarray],
    i2t: tuple[np.ndarray, np.ndarray],
    caption_image: np.ndarray,
) -> dict[str, float]:
    """:func:`recall_metrics` of a rerank: each query scored against its candidates only.

    t2i: (candidates (Nc, Kt) image rows, scores (Nc, Kt)), one row per caption; i2t:
    (candidates (Ni, Ki) caption rows, scores (Ni, Ki)), one row per image; caption_image (Nc,)
    the row of each caption's image. A ground truth outside a query's candidates is a miss
    (:func:`sparse_ranks`), so the medians and means are lower bounds when there are misses.
    With every image and every caption a candidate, this equals :func:`recall_metrics` of the
    dense matrix.
    """
    caption_image = np.asarray(caption_image)
    (tc, ts), (ic, is_) = t2i, i2t
    if tc.shape[0] != len(caption_image):
        raise ValueError(f"t2i has {tc.shape[0]} queries for {len(caption_image)} captions")
    truth_t = tc == caption_image[:, None]
    truth_i = caption_image[ic] == np.arange(ic.shape[0])[:, None]
    found = (truth_i.any(axis=1), truth_t.any(axis=1))
    return ranks_metrics(sparse_ranks(ic, is_, truth_i), sparse_ranks(tc, ts, truth_t), found)
