"""The search: a model reference, a data set split and sentences -> each sentence's best images,
and optionally a picture of the best match's attention.

Exhaustive (no index): every image of the split is scored against each sentence. With an index
(:mod:`shan.index`, ``shan index build``): the index's K nearest images of each sentence are
reranked with the same scorer (:func:`shan.rerank.search_index`); the data set is then not read
unless it is given (to check that the index was built from it, or to draw the picture).

Everything a user can get wrong (the options, the sentences, the split, the model, the index,
the picture's path) is checked before an image is encoded or a fragment read; errors are
:mod:`shan.errors` user errors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shan.checkpoint import CheckedModel, load_checked, load_model, require_first_stage
from shan.config import Checked, Problems
from shan.data import fs
from shan.data.format import CARD, load_card, load_vocab
from shan.data.reader import read_split
from shan.errors import JobError
from shan.fingerprint import data_fingerprint, file_digests, index_key
from shan.metrics import SCORES
from shan.pictures import attention_picture, marked_png
from shan.rerank import DEFAULT_RERANK, Ranked, rerank_problems, search_index
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
    from shan.checkpoint import LoadedModel
    from shan.data.reader import SplitArrays
    from shan.model import SHAN
    from shan.vocab import Vocabulary

PNG_MARK = b"shan search"  # a tEXt chunk: the pictures a search wrote, which it may overwrite


@dataclass
class SearchOptions(Checked):
    """The search's options; :meth:`check` raises every problem at once.

    ``index``: an index folder (``shan index build``) to search instead of scoring the whole
    split; ``rerank`` (K): how many of the index's nearest images are reranked (default
    :data:`DEFAULT_RERANK`; at least ``top``). With an index the split is the index's, and
    ``split`` (when not None) must name it; without one, None means ``test``."""

    split: str | None = "test"
    top: int = 5
    cache: str = "searches"  # local folder of image indexes
    picture: str | None = None  # a .png: the attention of the first query's best match
    index: str | None = None  # an index folder (local or s3://)
    rerank: int | None = None  # K; None: DEFAULT_RERANK with an index

    def problems(self) -> list[str]:
        """What is wrong with the options, one line each (the split is checked against the
        data set once its card is read)."""
        p = Problems()
        p.at_least("top", self.top, 1)
        p.extend(why for why in (cache_problem(self.cache), picture_problem(self.picture)) if why)
        if self.rerank is not None and self.index is None:
            p.append(f"--rerank {self.rerank}: give --index DEST too (rerank needs an index)")
        else:
            p.extend(rerank_problems(self.top, self.k_candidates))
        return list(p)

    @property
    def k_candidates(self) -> int | None:
        """K: the candidates each query reranks (None without an index)."""
        if self.index is None:
            return None
        return DEFAULT_RERANK if self.rerank is None else self.rerank


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
    data: str | None,
    sentences: list[str],
    opts: SearchOptions | None = None,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Rank the images of ``data``'s split for each sentence with the model ``model_ref``
    (anything :func:`shan.tracking.refs.resolve` accepts): all of them, or with ``opts.index``
    the index's K nearest, reranked (``data`` may then be None)."""
    opts = opts or SearchOptions()
    check_count(len(sentences))
    opts.check()
    if opts.index is not None:
        return search_with_index(model_ref, data, sentences, opts, log)
    if data is None:
        raise JobError("give --data (the data set searched) or --index (an index built from it)")
    split_name = opts.split or "test"
    card = load_card(data)
    vocab = load_vocab(data, card)
    _check_split(data, card.splits, split_name)
    queries = [parse_query(vocab, s, n=i + 1) for i, s in enumerate(sentences)]
    loaded = _load(model_ref, data)
    max_words = loaded.config.data.max_words
    queries = [parse_query(vocab, s, max_words, i + 1) for i, s in enumerate(sentences)]
    t0 = time.perf_counter()
    split = read_split(data, split_name, card, max_words=max_words)
    key = index_key(loaded.files, data_fingerprint(fs.read_bytes(fs.join(data, CARD)), split),
                    split_name)  # fmt: skip
    index, built = image_index(
        loaded.model, split.features, split.num_regions, split.image_ids, key=key,
        cache_dir=opts.cache, log=log,
    )  # fmt: skip
    t1 = time.perf_counter()
    matches = rank(loaded.model, index, [q.tokens for q in queries], opts.top)
    seconds = {"index": t1 - t0, "query": time.perf_counter() - t1}
    if opts.picture:
        _picture(loaded.model, vocab, split, queries[0], matches[0][0], path=opts.picture, log=log)
    return SearchResult(queries, matches, built, seconds)


def search_with_index(
    model_ref: str,
    data: str | None,
    sentences: list[str],
    opts: SearchOptions,
    log: Callable[[str], None] = print,
) -> SearchResult:
    """:func:`search` through the index ``opts.index``: each sentence's K nearest images by the
    first stage, reranked by the model's scorer. The model must be the index's (and have a
    first-stage head); ``data``, when given, must be the data set the index was built from."""
    from shan.index import check_card, open_index

    assert opts.index is not None and opts.k_candidates is not None
    if opts.picture and data is None:
        raise JobError(f"--picture {opts.picture} with --index needs --data (the image's regions)")
    if data is not None:  # the sentences and the split are checked before the model is loaded
        vocab = load_vocab(data, load_card(data))
        for i, s in enumerate(sentences):
            parse_query(vocab, s, n=i + 1)
    loaded = _load(model_ref, data)
    require_first_stage(loaded.model, model_ref)
    queries = [
        parse_query(loaded.vocab, s, loaded.config.data.max_words, i + 1)
        for i, s in enumerate(sentences)
    ]
    found = check_card(opts.index, model_files=loaded.files, data_fingerprint=None,
                       name=model_ref, split=opts.split)  # fmt: skip
    split, fingerprint = None, None
    if data is not None:
        split, fingerprint = _index_split(data, found.split, loaded)
    t0 = time.perf_counter()
    index = open_index(opts.index, model_files=loaded.files, data_fingerprint=fingerprint,
                       name=model_ref, split=opts.split)  # fmt: skip
    log(f"index {opts.index}: {len(index.image_ids):,} images of {index.card.data} "
        f"({index.card.split}); reranking the {opts.k_candidates} nearest")  # fmt: skip
    t1 = time.perf_counter()
    ranked = search_index(loaded.model, index, [q.tokens for q in queries], top=opts.top,
                          rerank=opts.k_candidates)  # fmt: skip
    matches = [_as_matches(r) for r in ranked]
    seconds = {"index": t1 - t0, "query": time.perf_counter() - t1}
    if opts.picture and split is not None:
        best = matches[0][0]
        row = int(np.flatnonzero(split.image_ids == best.image)[0])
        best = Match(best.rank, best.image, row, best.total, best.l2l, best.g2l, best.g2g)
        _picture(loaded.model, loaded.vocab, split, queries[0], best, path=opts.picture, log=log)
    return SearchResult(queries, matches, False, seconds)


def _load(model_ref: str, data: str | None) -> CheckedModel:
    """The model ``model_ref`` with its files' digests, checked against ``data`` when given."""
    resolved = refs.resolve(model_ref, os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        if data is not None:
            card = load_card(data)
            return load_checked(
                resolved.path, card, load_vocab(data, card), name=resolved.ref, data=data
            )
        loaded: LoadedModel = load_model(resolved.path)
        return CheckedModel(loaded.model, loaded.checkpoint, file_digests(resolved.path))
    finally:
        refs.cleanup([resolved])


def _check_split(data: str, splits: Iterable[str], split: str) -> None:
    if split not in splits:
        raise JobError(f"data set {data} has no split {split!r} (it has {list(splits)})")


def _index_split(data: str, split_name: str, loaded: CheckedModel) -> tuple[SplitArrays, str]:
    """The split of ``data`` an index holds, read, and its fingerprint (what the index's card
    must name); JobError when ``data`` lacks that split."""
    card = load_card(data)
    _check_split(data, card.splits, split_name)
    split = read_split(data, split_name, card, max_words=loaded.config.data.max_words)
    return split, data_fingerprint(fs.read_bytes(fs.join(data, CARD)), split)


def _as_matches(ranked: Ranked) -> list[Match]:
    return [
        Match(rank + 1, int(ranked.image_ids[i]), int(ranked.rows[i]),
              *(float(ranked.scores[s][i]) for s in SCORES))
        for rank, i in enumerate(range(len(ranked.rows)))
    ]  # fmt: skip


def _picture(
    model: SHAN,
    vocab: Vocabulary,
    split: SplitArrays,
    query: Query,
    best: Match,
    *,
    path: str,
    log: Callable[[str], None],
) -> None:
    title = f"image {best.image} (total {best.total:.3f}): {query.text}"
    png = attention_picture(model, vocab, split, best.row, query.tokens, title=title)
    write_picture(path, png)
    log(f"attention of the best match of {query.text!r} in {path}")


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
