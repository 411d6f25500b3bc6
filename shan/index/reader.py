"""Opening an index for queries: checked against the model and data it is used with, before any
work, each refusal one JobError line; then the FAISS index in memory and the fragments
memory-mapped, so that a rerank reads only its K candidates' rows.

An ``s3://`` index is downloaded once into a local cache folder named after the card's digest
(each file checked against the card's sha256), then memory-mapped like a local one.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from shan.data import fs
from shan.errors import JobError, StorageError
from shan.index import ann
from shan.index.card import CARD, IndexCard, model_digest
from shan.index.store import read_card

if TYPE_CHECKING:
    from shan.model import SHAN, EncodedImages

REBUILD = "build it again with shan index build"


def default_cache() -> Path:
    """Where ``s3://`` indexes are downloaded: ``$SHAN_INDEX_CACHE``, else
    ``~/.cache/shan/indexes``."""
    given = os.environ.get("SHAN_INDEX_CACHE")
    return Path(given) if given else Path.home() / ".cache" / "shan" / "indexes"


def check_card(
    dest: str,
    *,
    model_files: dict[str, str],
    data_fingerprint: str | None,
    name: str,
    split: str | None = None,
) -> IndexCard:
    """The card of the index at ``dest``, checked to be ours, complete, and built from the model
    whose files are ``model_files`` (``name``: the model as the user gave it) and from the data
    whose fingerprint is ``data_fingerprint`` (None: not checked) and ``split``; one JobError
    line otherwise."""
    try:
        card = read_card(dest)
    except StorageError as e:
        raise JobError(f"index {dest}: {e}") from None
    if card is None:
        if not fs.exists(dest):
            raise JobError(f"index {dest} does not exist: {REBUILD}")
        files = fs.list_files(dest)
        if files:
            shown = ", ".join(files[:3]) + (" ..." if len(files) > 3 else "")
            raise JobError(f"{dest} is not an index: it has no {CARD} (it holds {shown})")
        raise JobError(f"{dest} holds no index (no {CARD}): {REBUILD}")
    if card.model_digest != model_digest(model_files):
        raise JobError(
            f"index {dest} was built from model {card.model}, not from model {name} (their "
            f"files differ): build an index for {name} with shan index build"
        )
    if split is not None and split != card.split:
        raise JobError(f"index {dest} holds split {card.split!r} of {card.data}, not {split!r}")
    if data_fingerprint is not None and data_fingerprint != card.data_fingerprint:
        raise JobError(
            f"index {dest} was built from another data set ({card.data}, split {card.split}; "
            f"its fingerprint differs): {REBUILD}"
        )
    return card


def open_index(
    dest: str,
    *,
    model_files: dict[str, str],
    data_fingerprint: str | None,
    name: str,
    split: str | None = None,
    cache: str | Path | None = None,
) -> OpenIndex:
    """The index at ``dest`` (local folder or ``s3://`` prefix), checked (:func:`check_card`),
    its files checked against the card's sizes; JobError naming the problem otherwise."""
    card = check_card(
        dest, model_files=model_files, data_fingerprint=data_fingerprint, name=name, split=split
    )
    root = (
        _download(dest, card, Path(cache) if cache else default_cache())
        if fs.is_remote(dest)
        else fs.local_path(dest)
    )
    return OpenIndex(card, root, dest)


def _download(dest: str, card: IndexCard, cache: Path) -> Path:
    """The index's files in ``cache/<card digest>/`` (fetched once: the card copy is written
    last, so a folder holding it is complete)."""
    folder = cache / card.digest
    if (folder / CARD).is_file():
        return folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in card.files():
            path = folder / name
            if path.is_file() and path.stat().st_size == card.sizes[name]:
                continue
            _fetch(fs.join(dest, name), path, card.checksums[name])
        fs.write_atomic(folder / CARD, card.to_json().encode())
    except OSError as e:
        raise JobError(f"index {dest}: cannot copy it into the cache {folder} ({e})") from None
    return folder


def _fetch(uri: str, path: Path, sha: str) -> None:
    fsys, src = fs.filesystem(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    h = hashlib.sha256()
    try:
        with fsys.open_input_stream(src) as f, open(tmp, "wb") as out:
            while chunk := f.read(1 << 24):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != sha:
            raise JobError(f"index {uri}: its bytes are not the card's (sha256 differs): damaged")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class OpenIndex:
    """An index ready for queries: ``card``, ``image_ids`` (N,) int64, the FAISS index, and the
    fragments of each shard memory-mapped."""

    def __init__(self, card: IndexCard, root: Path, dest: str) -> None:
        self.card, self.root, self.dest = card, root, dest
        for name in card.files():
            self._check_size(name)
        try:
            self.ann = ann.read(str(root / card.vectors))
            self.image_ids = np.load(root / card.image_ids, allow_pickle=False)
            self._frags = [np.load(root / s.fragments, mmap_mode="r") for s in card.shards]
            self._counts = [np.load(root / s.regions, mmap_mode="r") for s in card.shards]
        except (OSError, ValueError, RuntimeError) as e:
            raise JobError(f"index {dest}: cannot read it ({e}): {REBUILD}") from None
        self._check_shapes()
        sizes = [s.images for s in card.shards]
        self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)

    def _check_size(self, name: str) -> None:
        path = self.root / name
        want = self.card.sizes[name]
        got = path.stat().st_size if path.is_file() else None
        if got is None:
            raise JobError(f"index {self.dest}: {name} is missing: {REBUILD}")
        if got != want:
            raise JobError(
                f"index {self.dest}: {name} has {got} bytes, its card says {want} (truncated or "
                f"changed): {REBUILD}"
            )

    def _check_shapes(self) -> None:
        c, bad = self.card, []
        if self.image_ids.shape != (c.images,) or self.ann.ntotal != c.images:
            bad.append(f"{c.image_ids} or {c.vectors} do not hold {c.images} images")
        for s, v, n in zip(c.shards, self._frags, self._counts):
            if v.shape != (s.images, c.regions, c.d) or n.shape != (s.images,):
                bad.append(f"{s.fragments} is {v.shape}, not ({s.images}, {c.regions}, {c.d})")
        if bad:
            raise JobError(f"index {self.dest}: {bad[0]}: {REBUILD}")

    def __len__(self) -> int:
        return self.card.images

    def search(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """First-stage query vectors (Q, D) float32 -> (rows (Q, k') int64, inner products
        (Q, k') float32), best first, k' = min(k, N); an approximate kind may leave -1 rows."""
        if np.ndim(vectors) != 2 or np.shape(vectors)[1] != self.card.dim:
            raise ValueError(f"query vectors must be (Q, {self.card.dim}), got {np.shape(vectors)}")
        return ann.search(self.ann, vectors, k)

    def fragments(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rows (n,) -> (v (n, k, d) float32, region counts (n,) int64), read from the
        memory-mapped shards (only those rows)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"rows must lie in 0..{len(self) - 1}")
        c = self.card
        v = np.empty((len(rows), c.regions, c.d), dtype=np.float32)
        counts = np.empty(len(rows), dtype=np.int64)
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            local = rows[sel] - self._starts[s]
            order = np.argsort(local, kind="stable")  # ascending reads
            v[sel[order]] = self._frags[s][local[order]]
            counts[sel[order]] = self._counts[s][local[order]]
        return v, counts

    def images(self, model: SHAN, rows: np.ndarray) -> EncodedImages:
        """rows (n,) -> those images encoded for the scorer (:meth:`SHAN.image_terms` of their
        stored ``v`` and the mask of their region counts), on the model's device."""
        import torch

        v, counts = self.fragments(rows)
        device = next(model.parameters()).device
        vt = torch.from_numpy(v).to(device)
        mask = (
            torch.arange(self.card.regions, device=device)[None, :]
            < torch.from_numpy(counts).to(device)[:, None]
        )
        with torch.no_grad():
            return model.image_terms(vt, mask)

    def info(self) -> dict[str, Any]:
        """The card's summary: kind, params, N, D, shards."""
        c = self.card
        return {"kind": c.kind, "params": c.params, "images": c.images, "dim": c.dim,
                "shards": len(c.shards)}  # fmt: skip


__all__ = ["OpenIndex", "check_card", "default_cache", "open_index"]
