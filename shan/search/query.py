"""Queries: sentences to token ids (refusing an empty sentence or one of only unknown words),
scored against an :class:`~shan.search.index.ImageIndex` with the model's one scorer
(:meth:`SHAN.score`, what evaluation uses), and the top K images per query by the total."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

from shan.errors import JobError
from shan.metrics import SCORES
from shan.vocab import Vocabulary, tokenize

if TYPE_CHECKING:
    from shan.model import SHAN, EncodedImages

QUERY_CHUNK = 256  # captions encoded and scored at a time
MAX_QUERY_CHARS = 2000  # a query's length: characters ...
MAX_QUERY_WORDS = 200  # ... and words (the model keeps its data.max_words of them)
MAX_QUERIES = 1000  # queries a search scores
SHOWN = 10  # unknown words an error names (then a count)
IMAGES_PER_BLOCK = 1024  # images per scorer block (one caption): its tensors stay small


@dataclass
class Query:
    """A sentence, its token ids (``<start>`` ... ``<end>``) and its words the vocabulary lacks
    (they are ``<unk>``)."""

    text: str
    tokens: list[int]
    unknown: list[str]


@dataclass
class Match:
    """One ranked image: ``rank`` from 1, the ``image`` id, its ``row`` in the split, and its
    scores (the total and each step)."""

    rank: int
    image: int
    row: int
    total: float
    l2l: float
    g2l: float
    g2g: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def parse_query(vocab: Vocabulary, text: str, max_words: int | None = None, n: int = 1) -> Query:
    """``text`` (the ``n``-th query) as a :class:`Query`; JobError when it is longer than
    :data:`MAX_QUERY_CHARS` or :data:`MAX_QUERY_WORDS`, has no word (empty, or punctuation
    only), or only words the vocabulary lacks (naming the first :data:`SHOWN`)."""
    if len(text) > MAX_QUERY_CHARS:
        raise JobError(
            f"query {n} ({shorten(text)}) has {len(text):,} characters; at most "
            f"{MAX_QUERY_CHARS:,} are accepted"
        )
    words = tokenize(text)
    if len(words) > MAX_QUERY_WORDS:
        raise JobError(
            f"query {n} ({shorten(text)}) has {len(words):,} words; at most {MAX_QUERY_WORDS} "
            "are accepted"
        )
    if not any(any(ch.isalnum() for ch in w) for w in words):
        what = "has no words" if not words else "has no word, only punctuation"
        raise JobError(f"query {n} is empty: {shorten(text)} {what}")
    unknown = list(dict.fromkeys(w for w in words if w not in vocab.word2idx))
    if len(unknown) == len(set(words)):
        raise JobError(
            f"query {n} ({shorten(text)}): none of its words is in the model's vocabulary "
            f"(unknown: {listed(unknown)})"
        )
    return Query(text, vocab.encode(text, max_words), unknown)


def shorten(text: str, width: int = 60) -> str:
    """``repr(text)``, cut to about ``width`` characters with its length said."""
    if len(text) <= width:
        return repr(text)
    return f"{text[:width]!r}... ({len(text):,} characters)"


def listed(words: list[str], shown: int = SHOWN) -> str:
    """The first ``shown`` of ``words``, comma-separated, then how many more."""
    head = ", ".join(w if len(w) <= 40 else w[:40] + "..." for w in words[:shown])
    return head + (f" and {len(words) - shown:,} more" if len(words) > shown else "")


def check_count(n_queries: int) -> None:
    """JobError unless 1 .. :data:`MAX_QUERIES` queries are given."""
    if n_queries < 1:
        raise JobError("no query: give at least one sentence")
    if n_queries > MAX_QUERIES:
        raise JobError(
            f"{n_queries:,} queries: a search takes at most {MAX_QUERIES:,}; split them into "
            "several searches"
        )


def query_block(n_queries: int) -> tuple[int, int]:
    """The scorer's block (images, captions) for a search: one caption at a time against
    :data:`IMAGES_PER_BLOCK` images. Measured on 2 CPU cores with the demo model, 1,000 images:
    about 50 ms a query; blocks of 2 to 8 captions were slower per query, not faster."""
    del n_queries  # one caption per block whatever the batch
    return IMAGES_PER_BLOCK, 1


def score_queries(
    model: SHAN,
    images: EncodedImages,
    tokens: list[list[int]],
    block: tuple[int, int] | None = None,
) -> dict[str, np.ndarray]:
    """Every image of ``images`` (N rows) against each token list (Q) -> {"total", "l2l",
    "g2l", "g2g"}, each (N, Q) float32: the columns :func:`shan.scoring.score_matrix` gives
    these captions."""
    import torch

    from shan.data.reader import pad_tokens

    model.eval()
    device = images.v.device
    out = {k: np.empty((len(images), len(tokens)), dtype=np.float32) for k in SCORES}
    with torch.no_grad():
        for q0 in range(0, len(tokens), QUERY_CHUNK):
            chunk = tokens[q0 : q0 + QUERY_CHUNK]
            toks, lens = pad_tokens(chunk)
            caps = model.encode_captions(toks.to(device), lens.to(device))
            sims = model.score(images, caps, block=block or query_block(len(chunk)))
            for k in SCORES:
                out[k][:, q0 : q0 + len(chunk)] = sims[k].float().cpu().numpy()
    return out


def top_matches(scores: dict[str, np.ndarray], image_ids: np.ndarray, k: int) -> list[list[Match]]:
    """Per query (column of the (N, Q) ``scores``), its ``k`` best images by the total,
    highest first; equal totals keep the split's order (the lower row first)."""
    total = scores["total"]
    out: list[list[Match]] = []
    for q in range(total.shape[1]):
        rows = np.argsort(-total[:, q], kind="stable")[:k]
        out.append(
            [
                Match(
                    rank + 1,
                    int(image_ids[r]),
                    int(r),
                    *(float(scores[s][r, q]) for s in SCORES),
                )
                for rank, r in enumerate(rows)
            ]
        )
    return out


def format_matches(query: Query, matches: list[Match]) -> str:
    """A query's matches as a small table."""
    head = repr(query.text)
    if query.unknown:
        head += f"  (not in the vocabulary: {listed(query.unknown)})"
    lines = [head, f"{'rank':>5} {'image':>10} {'total':>8} {'l2l':>8} {'g2l':>8} {'g2g':>8}"]
    for m in matches:
        lines.append(
            f"{m.rank:>5} {m.image:>10} {m.total:>8.4f} {m.l2l:>8.4f} {m.g2l:>8.4f} {m.g2g:>8.4f}"
        )
    return "\n".join(lines)
