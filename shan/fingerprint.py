"""Fingerprints: digests of what a stored result depends on, so that a result made from other
inputs is never reused. Evaluation tiles (``shan.eval.tiles``) and search indexes
(``shan.search.index``) are keyed by them.

- :func:`digest`: sha256 over length-prefixed parts (no two lists of parts collide);
- :func:`file_digests`: a checkpoint folder's files, name -> sha256 of the bytes;
- :func:`data_fingerprint`: a data set's card bytes and a digest of a split's arrays;
- :func:`index_key`: the search index's cache key (format, checkpoint files, data, split);
- :func:`scorer_digest`: SHAN's scoring weights and keys, without the first stage.

The bytes hashed are part of the stored files' identity: changing them makes every existing tile
store and search cache miss.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from shan.data.reader import SplitArrays

INDEX_FORMAT = "shan-search-index/1"  # the search index's file format, part of its key


def digest(*parts: bytes | str) -> str:
    """A digest of ``parts``, each length-prefixed (so no two lists of parts collide): 32 hex
    digits."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode() if isinstance(p, str) else bytes(p)
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


def file_digests(folder: str | Path) -> dict[str, str]:
    """Every file directly in ``folder`` (a checkpoint: weights, config, vocabulary): its name ->
    the sha256 of its bytes."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }


def content_digest(split: SplitArrays) -> str:
    """A digest of what is scored: image ids, features, region counts and caption tokens."""
    h = hashlib.sha256()
    for column in (split.image_ids, split.features, split.num_regions, split.caption_image):
        a = np.ascontiguousarray(column)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data.cast("B"))
    lengths = np.array([len(t) for t in split.tokens], dtype=np.int64)
    flat = (
        np.concatenate([np.asarray(t, dtype=np.int64) for t in split.tokens])
        if split.tokens
        else np.empty(0, dtype=np.int64)
    )
    h.update(lengths.tobytes())
    h.update(flat.astype(np.int64).tobytes())
    return h.hexdigest()


def data_fingerprint(card_bytes: bytes, split: SplitArrays) -> str:
    """The data's part of a fingerprint: the card's bytes (its creation time, and its content
    digest when it has one) and a digest of the arrays scored."""
    return digest("card", card_bytes, "content", content_digest(split))


def index_key(model_files: dict[str, str], data_fp: str, split: str) -> str:
    """The search index's cache key: sha256 over the format, every checkpoint file's digest
    (name -> sha256), the data fingerprint and the split name."""
    h = hashlib.sha256(INDEX_FORMAT.encode())
    for name, sha in sorted(model_files.items()):
        h.update(f"\0file\0{name}\0{sha}".encode())
    h.update(f"\0data\0{data_fp}\0split\0{split}".encode())
    return h.hexdigest()


def scorer_digest(state: Mapping[str, Any], model_keys: Mapping[str, Any], max_words: int) -> str:
    """A digest of what SHAN's scores depend on: every weight of the state dict ``state`` but
    the first stage's (``first_stage.*``), the ``model.*`` config keys ``model_keys`` but the
    first stage's, and the caption cut ``max_words``. Two checkpoints of one digest score every
    pair alike (``shan index head`` writes one with another first stage and this digest)."""
    parts: list[bytes | str] = ["max_words", str(max_words)]
    for key in sorted(model_keys):
        if not key.startswith("model.first_stage"):
            parts += [key, repr(model_keys[key])]
    for name in sorted(state):
        if name.startswith("first_stage."):
            continue
        t = state[name].detach().cpu().contiguous()
        parts += [name, str(t.dtype), str(tuple(t.shape)), t.numpy().tobytes()]
    return digest(*parts)
