"""The search: a model reference, a data set split and sentences -> each sentence's best images,
and optionally a picture of the best match's attention.

Everything a user can get wrong (the options, the sentences, the split, the model, the picture's
path) is checked before an image is encoded; errors are :mod:`shan.errors` user errors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shan.checkpoint import load_checked
from shan.config import Checked, Problems
from shan.data import fs
from shan.data.format import CARD, load_card, load_vocab
from shan.data.reader import read_split
from shan.errors import JobError
from shan.fingerprint import data_fingerprint, index_key
from shan.pictures import attention_picture, marked_png
from shan.search.index import ImageIndex, cache_problem, image_index
from shan.search.query import (
    Match,
    Query,
    check_count,
    parse_query,
    score_queries,
    top_matches,
)
from shan.tracking import refs

if TYPE_CHECKING:
    from shan.model import SHAN

PNG_MARK = b"shan search"  # a tEXt chunk: the pictures a search wrote, which it may overwrite


@dataclass
class SearchOptions(Checked):
    """The search's options; :meth:`check` raises every problem at once."""

    split: str = "test"
    top: int = 5
    cache: str = "searches"  # local folder of image indexes
    picture: str | None = None  # a .png: the attention of the first query's best match

    def problems(self) -> list[str]:
        """What is wrong with the options, one line each (the split is checked against the
        data set once its card is read)."""
        p = Problems()
        p.at_least("top", self.top, 1)
        p.extend(why for why in (cache_problem(self.cache), picture_problem(self.picture)) if why)
        return list(p)


@dataclass
class SearchResult:
    """Per query its :class:`Query` and top matches; whether the index was built (a cold
    cache) and the seconds each phase took (``index``, ``query``)."""

    queries: list[Query]
    matches: list[list[Match]]
    built: bool
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> list[dict]:
        """Per query ``{"query", "unknown", "matches": [{rank, image, row, total, l2l, g2l,
        g2g}, ...]}``."""
        return [
            {"query": q.text, "unknown": q.unknown, "matches": [m.to_dict() for m in ms]}
            for q, ms in zip(self.queries, self.matches)
        ]


def picture_problem(path: str | None) -> str | None:
    """Why ``path`` cannot be the picture (a new, or our own, local ``.png`` file in a folder
    we may write in); None when it can."""
    if path is None:
        return None
    p = Path(path)
    if "://" in path or p.suffix.lower() != ".png":
        return f"--picture {path}: give a local path ending in .png"
    if p.exists() and not (p.is_file() and PNG_MARK in _head(p)):
        return f"--picture {path} exists and is not a search's picture; it is left alone"
    if not p.parent.is_dir():
        return f"--picture {path}: folder {p.parent} does not exist"
    if not os.access(p.parent, os.W_OK | os.X_OK):
        return f"--picture {path}: cannot write in folder {p.parent}"
    return None


def _head(path: Path, size: int = 4096) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def search(
    model_ref: str,
    data: str,
    sentences: list[str],
    opts: SearchOptions | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Rank the images of ``data``'s split for each sentence with the model ``model_ref``
    (anything :func:`shan.tracking.refs.resolve` accepts)."""
    opts = opts or SearchOptions()
    check_count(len(sentences))
    opts.check()
    card = load_card(data)
    vocab = load_vocab(data, card)
    if opts.split not in card.splits:
        raise JobError(f"data set {data} has no split {opts.split!r} (it has {list(card.splits)})")
    queries = [parse_query(vocab, s, n=i + 1) for i, s in enumerate(sentences)]
    resolved = refs.resolve(model_ref, os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        loaded = load_checked(resolved.path, card, vocab, name=resolved.ref, data=data)
    finally:
        refs.cleanup([resolved])
    max_words = loaded.config.data.max_words
    queries = [parse_query(vocab, s, max_words, i + 1) for i, s in enumerate(sentences)]
    t0 = time.perf_counter()
    split = read_split(data, opts.split, card, max_words=max_words)
    key = index_key(loaded.files, data_fingerprint(fs.read_bytes(fs.join(data, CARD)), split),
                    opts.split)  # fmt: skip
    index, built = image_index(
        loaded.model, split.features, split.num_regions, split.image_ids, key=key,
        cache_dir=opts.cache, log=log,
    )  # fmt: skip
    t1 = time.perf_counter()
    matches = rank(loaded.model, index, [q.tokens for q in queries], opts.top)
    seconds = {"index": t1 - t0, "query": time.perf_counter() - t1}
    if opts.picture:
        best, query = matches[0][0], queries[0]
        title = f"image {best.image} (total {best.total:.3f}): {query.text}"
        png = attention_picture(loaded.model, vocab, split, best.row, query.tokens, title=title)
        write_picture(opts.picture, png)
        log(f"attention of the best match of {queries[0].text!r} in {opts.picture}")
    return SearchResult(queries, matches, built, seconds)


def rank(model: SHAN, index: ImageIndex, tokens: list[list[int]], top: int) -> list[list[Match]]:
    """The ``top`` images of ``index`` for each token list."""
    return top_matches(score_queries(model, index.images, tokens), index.image_ids, top)


def write_picture(path: str, png: bytes) -> None:
    """Write ``png`` (marked as ours) to ``path`` atomically; JobError naming the file when it
    cannot be written."""
    try:
        fs.write_atomic(path, marked_png(png, PNG_MARK))
    except OSError as e:
        raise JobError(f"--picture {path}: cannot write it ({e.strerror or e})") from None
