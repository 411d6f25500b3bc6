"""Writing an index folder (local or ``s3://``) the way data sets are written
(:mod:`shan.data.destination`): the destination is checked before any work; a local index is
built in a hidden staging folder beside it and renamed into place; on ``s3://`` its files go
under a prefix of their own and the card is written last. The card's presence means complete;
a failed write leaves no card and removes what it wrote. What the project did not write is never
overwritten: a destination holding other files is refused, and an existing index is replaced
only with ``overwrite``.

Layout: ``index.json`` (the card, :mod:`shan.index.card`), ``vectors.faiss``,
``image_ids.npy`` (N,) int64, and per shard of at most ``shard_size`` images
``fragments-XXXXX.npy`` (n, k, d) float32 region embeddings and ``regions-XXXXX.npy`` (n,)
int64 region counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from shan.data import fs
from shan.data.destination import (
    GENERATION,
    MARKER,
    _check_parent,
    _remove_dead_stages,
    _remove_listed,
    _write_durably,
    exchange,
    local_entries,
)
from shan.errors import JobError
from shan.index import ann
from shan.index.card import (
    CARD,
    IMAGE_IDS,
    VECTORS,
    IndexCard,
    Shard,
    fragments_file,
    regions_file,
)

SHARD_SIZE = 8192  # images a fragments file holds at most (36 regions x 1024-d: 1.2 GB)


def read_card(dest: str) -> IndexCard | None:
    """The card of the index at ``dest``; None when there is none; JobError when the card is
    not one of ours."""
    where = fs.join(dest, CARD)
    if not fs.exists(where):
        return None
    return IndexCard.from_json(fs.read_bytes(where), where)


def _shown(files: list[str]) -> str:
    return ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")


def _check_existing(dest: str, files: list[str], overwrite: bool) -> IndexCard | None:
    """The index already at ``dest`` (None: none); JobError when ``dest`` holds anything we
    may not replace."""
    card = read_card(dest) if CARD in files else None
    if card is not None and not overwrite:
        raise JobError(
            f"--out {dest} already holds an index (of model {card.model}, split {card.split}); "
            "pass --overwrite to replace it"
        )
    ours = {CARD, *card.files()} if card else set()
    foreign = [f for f in files if f not in ours and not GENERATION.match(f)]
    if foreign:
        what = "files that are not part of its index" if card else "files"
        raise JobError(
            f"--out {dest} already holds {what} ({_shown(foreign)}); nothing was written: "
            "choose a new or empty location"
        )
    return card


def check_destination(
    dest: str, *, overwrite: bool = True, log: Callable[[str], None] = print
) -> IndexCard | None:
    """Check ``dest`` before any work: the index already there (None: an empty or new
    location); JobError when ``dest`` holds anything else (or, without ``overwrite``, an
    index)."""
    fs.check_writable(dest)
    if fs.is_remote(dest):
        return _s3_existing(dest.rstrip("/"), overwrite, log)
    return _local_existing(dest, overwrite, log)


def _local_existing(given: str, overwrite: bool, log: Callable[[str], None]) -> IndexCard | None:
    dest = Path(given).resolve()
    if dest.exists() and not dest.is_dir():
        raise JobError(f"--out {given} is a file, not a folder; nothing was written")
    _check_parent(dest, given)
    _remove_dead_stages(dest, log)
    files, others = local_entries(dest)
    return _check_existing(str(dest), files + others, overwrite)


def _s3_existing(dest: str, overwrite: bool, log: Callable[[str], None]) -> IndexCard | None:
    fsys, path = fs.filesystem(dest)
    if fsys.get_file_info(path).type == pafs.FileType.File:
        raise JobError(f"--out {dest} is an object, not a prefix; nothing was written")
    files = fs.list_files(dest)
    old = _check_existing(dest, files, overwrite)
    stale = sorted({f.split("/", 1)[0] for f in files if GENERATION.match(f)})
    in_use = {f.split("/", 1)[0] for f in old.files()} if old else set()
    stale = [g for g in stale if g not in in_use]
    if stale:
        log(f"note: {dest} holds {', '.join(stale)}: files of an interrupted write")
    return old


class _Hashing:
    """A binary file's writer that keeps the sha256 and size of what went through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, b: Any) -> int:
        data = memoryview(b).cast("B")
        self.sha.update(data)
        self.size += len(data)
        self.f.write(data)
        return len(data)


class _LocalTarget:
    """A hidden staging folder beside ``dest``, swapped in when complete."""

    def __init__(self, dest: str, overwrite: bool, log: Callable[[str], None]) -> None:
        self.dest = Path(dest).resolve()
        self.old = _local_existing(dest, overwrite, log)
        self.path = self.dest.parent / f".{self.dest.name}.partial-{secrets.token_hex(4)}"
        try:
            self.path.mkdir()
            owner = {"host": socket.gethostname(), "pid": os.getpid(), "dest": str(self.dest)}
            (self.path / MARKER).write_text(json.dumps(owner))
        except OSError as e:
            raise fs.write_error(e, f"the staging folder {self.path}") from None

    def open(self, name: str) -> Any:
        return open(self.path / name, "wb")

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)  # the staging folder: all of it is ours

    def commit(self, card: IndexCard, log: Callable[[str], None]) -> None:
        _write_durably(self.path / CARD, card.to_json().encode())
        (self.path / MARKER).unlink()
        files, others = local_entries(self.dest)
        ours = {CARD, *self.old.files()} if self.old else set()
        foreign = [f for f in files if f not in ours] + others
        if foreign:  # written there while we built
            raise JobError(f"--out {self.dest} now holds files ({_shown(foreign)}); left alone")
        if self.old is None:
            if self.dest.exists():
                _remove_listed(self.dest, [])  # empty (sub)folders only
            os.rename(self.path, self.dest)
            return
        exchange(self.path, self.dest)
        try:
            _remove_listed(self.path, sorted(ours))
        except OSError as e:
            log(f"note: the previous index's files are left in {self.path} ({e})")


class _S3Target:
    """New files under a prefix of their own; the card last; then the old card's files go."""

    def __init__(self, dest: str, overwrite: bool, log: Callable[[str], None]) -> None:
        self.dest = dest.rstrip("/")
        self.old = _s3_existing(self.dest, overwrite, log)
        fsys, path = fs.filesystem(self.dest)
        self.prefix = f"gen-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{secrets.token_hex(4)}/"
        self.created: list[str] = []
        self.fsys, self.root = fsys, path

    def open(self, name: str) -> Any:
        self.created.append(name)
        return self.fsys.open_output_stream(f"{self.root}/{self.prefix}{name}")

    def discard(self) -> None:
        for name in self.created:
            try:
                fs.delete_file(fs.join(self.dest, self.prefix + name))
            except fs.StorageError:
                pass

    def commit(self, card: IndexCard, log: Callable[[str], None]) -> None:
        fs.write_bytes(fs.join(self.dest, CARD), card.to_json().encode())
        if self.old is None:
            return
        keep = set(card.files())  # the new card is in place: nothing may fail it now
        for f in self.old.files():
            if f not in keep:
                try:
                    fs.delete_file(fs.join(self.dest, f))
                except fs.StorageError as e:
                    log(f"note: {f} of the previous index is left in {self.dest} ({e})")


class IndexWriter:
    """Writes an index to ``dest``: the destination is checked when made (JobError before any
    work when refused); :meth:`add` takes the images in row order, :meth:`commit` builds the
    FAISS index and writes the card last; used as a context manager, an exception discards
    everything written.

    >>> with IndexWriter(dest) as w:
    ...     w.add(image_ids, vectors, v, counts)
    ...     card = w.commit(model="m", model_files=files, data="d", data_fingerprint=fp,
    ...                     split="test")
    """

    def __init__(
        self,
        dest: str,
        *,
        overwrite: bool = False,
        shard_size: int = SHARD_SIZE,
        log: Callable[[str], None] = print,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {shard_size}")
        fs.check_writable(dest)
        self.log, self.shard_size = log, shard_size
        target = _S3Target if fs.is_remote(dest) else _LocalTarget
        self.target: _LocalTarget | _S3Target = target(dest, overwrite, log)
        self.dest = dest
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # (v, counts) not yet written
        self._ids: list[np.ndarray] = []
        self._vectors: list[np.ndarray] = []
        self.shards: list[Shard] = []
        self.sizes: dict[str, int] = {}
        self.checksums: dict[str, str] = {}
        self.done = False

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None or not self.done:
            self.target.discard()

    @property
    def rows(self) -> int:
        return sum(len(i) for i in self._ids)

    def add(
        self, image_ids: np.ndarray, vectors: np.ndarray, v: np.ndarray, counts: np.ndarray
    ) -> None:
        """The next n images: ids (n,), first-stage vectors (n, D), region embeddings v
        (n, k, d) and region counts (n,)."""
        n = len(image_ids)
        if not (len(vectors) == len(v) == len(counts) == n) or v.ndim != 3:
            raise ValueError(
                f"add: ids {np.shape(image_ids)}, vectors {np.shape(vectors)}, v {np.shape(v)} "
                f"and counts {np.shape(counts)} must be n rows (v: (n, k, d))"
            )
        self._ids.append(np.asarray(image_ids, dtype=np.int64))
        self._vectors.append(np.asarray(vectors, dtype=np.float32))
        self._pending.append((np.asarray(v, dtype=np.float32), np.asarray(counts, np.int64)))
        while sum(len(c) for _, c in self._pending) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int) -> None:
        v = np.concatenate([p[0] for p in self._pending])
        counts = np.concatenate([p[1] for p in self._pending])
        self._pending = [(v[n:], counts[n:])] if len(counts) > n else []
        i = len(self.shards)
        self._write(fragments_file(i), v[:n])
        self._write(regions_file(i), counts[:n])
        self.shards.append(Shard(fragments_file(i), regions_file(i), int(min(n, len(counts)))))
        self.fragment_shape = v.shape[1:]

    def _write(self, name: str, data: np.ndarray | bytes) -> None:
        try:
            with self.target.open(name) as f:
                h = _Hashing(f)
                if isinstance(data, bytes):
                    h.write(data)
                else:
                    np.lib.format.write_array(h, np.ascontiguousarray(data), allow_pickle=False)
        except OSError as e:
            raise fs.write_error(e, fs.join(self.dest, name)) from None
        key = name if isinstance(self.target, _LocalTarget) else self.target.prefix + name
        self.sizes[key], self.checksums[key] = h.size, h.sha.hexdigest()

    def commit(
        self,
        *,
        model: str,
        model_files: dict[str, str],
        data: str,
        data_fingerprint: str,
        split: str,
        kind: str = "auto",
        created_by: str = "shan index build",
    ) -> IndexCard:
        """Write the last shard, the FAISS index (``kind``: :func:`shan.index.ann.choose_kind`)
        and the ids, then the card; the index is in place when this returns."""
        if self._pending:
            self._flush(sum(len(c) for _, c in self._pending))
        if not self.shards:
            raise JobError(f"no images to index for {self.dest}")
        vectors = np.concatenate(self._vectors)
        index, kind, params = ann.build(vectors, kind)
        self._write(VECTORS, ann.to_bytes(index))
        self._write(IMAGE_IDS, np.concatenate(self._ids))
        prefix = "" if isinstance(self.target, _LocalTarget) else self.target.prefix
        shards = [Shard(prefix + s.fragments, prefix + s.regions, s.images) for s in self.shards]
        k, d = self.fragment_shape
        card = IndexCard(
            model=model, model_files=dict(model_files), data=data,
            data_fingerprint=data_fingerprint, split=split, images=len(vectors),
            dim=int(vectors.shape[1]), regions=int(k), d=int(d), kind=kind, params=params,
            shard_size=self.shard_size, shards=shards, sizes=self.sizes,
            checksums=self.checksums, vectors=prefix + VECTORS, image_ids=prefix + IMAGE_IDS,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            created_by=created_by,
        )  # fmt: skip
        try:
            self.target.commit(card, self.log)
        except OSError as e:
            raise fs.write_error(e, fs.join(self.dest, CARD)) from None
        self.done = True
        return card


__all__ = ["SHARD_SIZE", "IndexWriter", "check_destination", "read_card"]
