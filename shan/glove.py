"""GloVe vectors in their text format, aligned to a :class:`~shan.vocab.Vocabulary`.

Each line is ``word v1 v2 ... vD``. Words of the vocabulary that the file lacks get small random
vectors (normal, std 0.1 times the file's own std), seeded by the word itself, so every loader
gives the same matrix. A word may contain spaces (a line is split at its last D spaces). A line
with the wrong number of values, or values that are not finite numbers, raises
:class:`GloveError` naming the file and line.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np

from shan.errors import GloveError
from shan.vocab import PAD, Vocabulary


def load_glove(path: str | Path, vocab: Vocabulary, dim: int) -> np.ndarray:
    """Return a ``(len(vocab), dim)`` float32 matrix; the ``<pad>`` row is zero.

    A line is a word and ``dim`` values, split at the last ``dim`` spaces: a word may hold
    spaces (``glove.840B.300d.txt`` has such lines). Only values of vocabulary words are
    parsed, so a 5 GB file is read at disk speed. A word the file lacks gets a row drawn from
    N(0, (0.1 std)^2), std that of the found rows, seeded by the word itself (:func:`oov_row`):
    the driver, ``build_model`` and a rerun give the same matrix (docs/model.md §2).
    """
    path = Path(path)
    if not path.is_file():
        raise GloveError(f"GloVe file {path} does not exist")
    out = np.zeros((len(vocab), dim), dtype=np.float32)
    found = np.zeros(len(vocab), dtype=bool)
    with path.open("r", encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, start=1):
            word, *values = line.rstrip("\n").rsplit(" ", dim)
            if len(values) != dim:
                raise GloveError(
                    f"{path}, line {lineno}: expected a word and {dim} values, "
                    f"got {len(values)} values"
                )
            idx = vocab.word2idx.get(word)
            if idx is None or found[idx]:
                continue
            try:
                vec = np.array([float(v) for v in values], dtype=np.float32)
            except ValueError:
                raise GloveError(f"{path}, line {lineno}: a value is not a number") from None
            if not np.isfinite(vec).all():
                raise GloveError(f"{path}, line {lineno}: non-finite value")
            out[idx] = vec
            found[idx] = True
    std = float(out[found].std()) if found.any() else 1.0 / math.sqrt(dim)
    for row in np.flatnonzero(~found):
        out[row] = oov_row(vocab.idx2word[int(row)], dim, 0.1 * std)
    out[vocab.word2idx[PAD]] = 0.0
    return out


def oov_row(word: str, dim: int, scale: float) -> np.ndarray:
    """(dim,) float32 N(0, scale^2) row for a word GloVe lacks, seeded by the word's CRC32."""
    rng = np.random.default_rng(zlib.crc32(word.encode("utf-8")))
    return rng.normal(0.0, scale, size=dim).astype(np.float32)


def save_glove(path: str | Path, words: list[str], vectors: np.ndarray) -> None:
    """Write ``vectors`` (N, D) in GloVe's text format (used by tests and tools)."""
    with Path(path).open("w", encoding="utf-8") as f:
        for w, v in zip(words, vectors, strict=True):
            f.write(w + " " + " ".join(f"{x:.6f}" for x in v) + "\n")
