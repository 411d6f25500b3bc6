"""The search: a model reference, a data set split and sentences -> each sentence's best images,
and optionally a picture of the best match's attention.

Everything a user can get wrong (the options, the sentences, the split, the model, the picture's
path) is checked before an image is encoded; errors are :mod:`shan.errors` user errors.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shan.data import fs
from shan.data.format import CARD, load_card, load_vocab
from shan.data.reader import read_split
from shan.errors import JobError
from shan.search.index import ImageIndex, image_index, index_key, write_atomically
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
    from shan.data.reader import SplitArrays
    from shan.model import SHAN
    from shan.vocab import Vocabulary

PNG_MARK = b"shan search"  # a tEXt chunk: the pictures a search wrote, which it may overwrite


@dataclass
class SearchOptions:
    split: str = "test"
    top: int = 5
    cache: str = "searches"  # local folder of image indexes
    picture: str | None = None  # a .png: the attention of the first query's best match


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


def check_picture(path: str | None) -> None:
    """JobError when ``path`` is not a new (or our own) local ``.png`` file."""
    if path is None:
        return
    p = Path(path)
    if "://" in path or p.suffix.lower() != ".png":
        raise JobError(f"--picture {path}: give a local path ending in .png")
    if p.exists() and not (p.is_file() and PNG_MARK in _head(p)):
        raise JobError(f"--picture {path} exists and is not a search's picture; it is left alone")
    if not p.parent.is_dir():
        raise JobError(f"--picture {path}: folder {p.parent} does not exist")
    if not os.access(p.parent, os.W_OK | os.X_OK):
        raise JobError(f"--picture {path}: cannot write in folder {p.parent}")


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
    from shan.eval.job import data_fingerprint, load_checked

    opts = opts or SearchOptions()
    if opts.top < 1:
        raise JobError(f"top must be at least 1, got {opts.top}")
    check_count(len(sentences))
    check_picture(opts.picture)
    card = load_card(data)
    vocab = load_vocab(data, card)
    if opts.split not in card.splits:
        raise JobError(f"data set {data} has no split {opts.split!r} (it has {list(card.splits)})")
    queries = [parse_query(vocab, s, n=i + 1) for i, s in enumerate(sentences)]
    resolved = refs.resolve(model_ref, os.environ.get("MLFLOW_TRACKING_URI"))
    try:
        loaded = load_checked(resolved, data, card, vocab)
    finally:
        refs.cleanup([resolved])
    max_words = loaded.weights.config.data.max_words
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
        best = matches[0][0]
        write_picture(opts.picture, draw_match(loaded.model, vocab, split, queries[0], best))
        log(f"attention of the best match of {queries[0].text!r} in {opts.picture}")
    return SearchResult(queries, matches, built, seconds)


def rank(model: SHAN, index: ImageIndex, tokens: list[list[int]], top: int) -> list[list[Match]]:
    """The ``top`` images of ``index`` for each token list."""
    return top_matches(score_queries(model, index.images, tokens), index.image_ids, top)


def draw_match(
    model: SHAN, vocab: Vocabulary, split: SplitArrays, query: Query, match: Match
) -> bytes:
    """A PNG of which regions of the matched image each word of ``query`` attends to (the
    evaluation's attention picture)."""
    from shan.eval import outputs

    row, count = match.row, int(split.num_regions[match.row])
    beta = outputs.word_region_attention(model, split.features[row], count, query.tokens)
    boxes = None if split.boxes is None else split.boxes[row][:count]
    uris = split.image_uris
    image = outputs.load_image(uris[row]) if uris is not None and boxes is not None else None
    title = f"image {match.image} (total {match.total:.3f}): {query.text}"
    return outputs.plot_attention(vocab.decode(query.tokens), beta, boxes, title, image)


def marked_png(png: bytes) -> bytes:
    """``png`` with a tEXt chunk ``Software: shan search`` after its header chunk."""
    body = b"Software\0" + PNG_MARK
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body) & 0xFFFFFFFF)
    ihdr_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4  # signature, IHDR, its CRC
    return png[:ihdr_end] + chunk + png[ihdr_end:]


def write_picture(path: str, png: bytes) -> None:
    """Write ``png`` (marked as ours) to ``path`` atomically; JobError naming the file when it
    cannot be written."""
    try:
        write_atomically(Path(path), lambda f: f.write(marked_png(png)))
    except OSError as e:
        raise JobError(f"--picture {path}: cannot write it ({e.strerror or e})") from None
