"""Writing a data set so that nothing the project did not write is ever deleted or overwritten,
and an interrupted or failed write never looks complete nor spoils the data set it replaces.

The destination (``shan.data.destination``) is checked first: a new data set goes only where
nothing is, or into an empty folder; ``overwrite`` replaces only a data set (its card present)
and removes only the files its card lists.

Local: the new data set is built in a hidden folder beside the destination and swapped in at
the end (one atomic exchange of the two folders where the kernel offers it). ``s3://``: the new
files go under a prefix of their own (``DEST/gen-<time>-<id>/``), the card is written last (an
S3 put is atomic), and only then are the old card's files removed; on failure only the keys
this write created are deleted.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shan.data import destination, fs
from shan.data.format import (
    CARD,
    DTYPES,
    VOCAB,
    DataError,
    DatasetCard,
    SplitInfo,
    check_relative,
    check_rows,
    check_split_name,
    schema,
)
from shan.vocab import MAX_WORDS, Vocabulary, tokenizer_id


class HashingFile:
    """A writable file object that passes bytes on to a pyarrow stream and hashes them."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.sha, self.size, self.closed = stream, hashlib.sha256(), 0, False

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.stream.write(view)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        if not self.closed:
            self.stream.close()
            self.closed = True


def put(uri: str, data: bytes) -> str:
    """Write ``data`` to ``uri``; its sha256."""
    fs.write_bytes(uri, data)
    return hashlib.sha256(data).hexdigest()


class SplitWriter:
    """Writes one split as shards of at most ``rows_per_file`` rows, row groups of
    ``row_group_rows``; checks every chunk before it is written."""

    def __init__(
        self, ds: DatasetWriter, split: str, rows_per_file: int, row_group_rows: int
    ) -> None:
        for name, value in (("rows_per_file", rows_per_file), ("row_group_rows", row_group_rows)):
            if int(value) < 1:
                raise DataError(f"{name} must be at least 1, got {value}")
        self.ds, self.split = ds, split
        self.rows_per_file, self.row_group_rows = int(rows_per_file), int(row_group_rows)
        self.files: list[str] = []
        self.images = self.captions = 0
        self.seen: set[int] = set()
        self._writer: pq.ParquetWriter | None = None
        self._sink: HashingFile | None = None
        self._rows_in_file = 0

    def _open(self) -> pq.ParquetWriter:
        rel = f"{self.ds.prefix}{self.split}/part-{len(self.files):05d}.parquet"
        check_relative(rel, self.ds.dest)  # never a file outside the data set
        self.files.append(rel)
        uri = fs.join(self.ds.stage, rel)
        filesystem, path = fs.filesystem(uri)
        if not fs.is_remote(uri):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.ds.created.append(rel)
        self._sink = HashingFile(filesystem.open_output_stream(path))
        writer = pq.ParquetWriter(
            self._sink,
            self.ds.schema,
            compression="zstd",
            use_dictionary=["image_id"],
            write_statistics=["image_id", "num_regions"],
            use_byte_stream_split=["features.list.element"],
        )
        self._writer, self._rows_in_file = writer, 0
        return writer

    def write(
        self,
        image_ids: np.ndarray,
        features: np.ndarray,
        captions: list[list[str]],
        *,
        num_regions: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        image_files: list[str] | None = None,
        image_sizes: np.ndarray | None = None,
    ) -> None:
        """features (B, R, F); captions: B lists of strings; num_regions (B,) or None (all);
        boxes (B, R, 4) when the data set has them; image_files (B paths relative to the
        card's ``image_root``) and image_sizes (B, 2) width, height when it has images."""
        card = self.ds.card
        if features.ndim != 3 or features.shape[1:] != (card.regions, card.feature_dim):
            raise DataError(
                f"{self.split}: features of shape {features.shape}, expected "
                f"(rows, {card.regions}, {card.feature_dim})"
            )
        with np.errstate(over="ignore"):
            feats = features.astype(DTYPES[card.dtype], copy=False)
        image_ids = np.asarray(image_ids, dtype=np.int64)
        if num_regions is None:
            num_regions = np.full(len(feats), card.regions, dtype=np.int32)
        num_regions = np.asarray(num_regions, dtype=np.int32)
        with np.errstate(over="ignore", invalid="ignore"):
            check_rows(
                self.split,
                self.images,
                image_ids,
                feats,
                num_regions,
                captions=captions,
                seen_ids=self.seen,
            )
        cut = self.ds.max_words or MAX_WORDS  # the format's limit when the caller sets none
        tokens = [[self.ds.vocab.encode(c, cut) for c in caps] for caps in captions]
        columns = {
            "image_id": pa.array(image_ids),
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(feats)),
            "num_regions": pa.array(num_regions),
            "captions": pa.array(captions, type=pa.list_(pa.string())),
            "tokens": pa.array(tokens, type=pa.list_(pa.list_(pa.int32()))),
        }
        if card.has_boxes:
            columns["boxes"] = self._boxes(boxes, len(feats))
        if card.has_images:
            columns.update(self._images(image_files, image_sizes, len(feats)))
        table = pa.table(columns, schema=self.ds.schema)
        start, writer = 0, self._writer
        while start < len(table):
            if writer is None or self._rows_in_file >= self.rows_per_file:
                self._close_file()
                writer = self._open()
            take = min(self.rows_per_file - self._rows_in_file, len(table) - start)
            writer.write_table(table.slice(start, take), row_group_size=self.row_group_rows)
            self._rows_in_file += take
            start += take
        self.images += len(table)
        self.captions += sum(len(c) for c in captions)

    def _boxes(self, boxes: np.ndarray | None, rows: int) -> pa.Array:
        card = self.ds.card
        if boxes is None:
            raise DataError(f"{self.split}: the data set has boxes but none were given")
        b = np.ascontiguousarray(boxes, dtype=np.float32)
        if b.shape != (rows, card.regions, 4):
            raise DataError(
                f"{self.split}: boxes of shape {b.shape}, expected ({rows}, {card.regions}, 4)"
            )
        if not np.isfinite(b).all():
            raise DataError(f"{self.split}: boxes hold NaN or infinite values")
        return pa.FixedShapeTensorArray.from_numpy_ndarray(b)

    def _images(
        self, files: list[str] | None, sizes: np.ndarray | None, rows: int
    ) -> dict[str, pa.Array]:
        if files is None or sizes is None or len(files) != rows:
            raise DataError(f"{self.split}: the data set has images but no file and size each")
        wh = np.asarray(sizes, dtype=np.int32).reshape(rows, 2)
        if (wh < 1).any() or not all(files):
            raise DataError(f"{self.split}: an image without a file name or of size 0")
        return {
            "image_file": pa.array(list(files), type=pa.string()),
            "image_width": pa.array(wh[:, 0]),
            "image_height": pa.array(wh[:, 1]),
        }

    def _close_file(self) -> None:
        if self._writer is not None and self._sink is not None:
            self._writer.close()
            self._sink.close()
            self.ds.checksums[self.files[-1]] = self._sink.sha.hexdigest()
            self._writer, self._sink = None, None

    def abort(self) -> None:
        try:
            if self._writer is not None:
                self._writer.close()
            if self._sink is not None:
                self._sink.close()
        except Exception:
            pass

    def close(self) -> SplitInfo:
        self._close_file()
        if self.images == 0:
            raise DataError(f"split {self.split!r} has no rows")
        return SplitInfo(images=self.images, captions=self.captions, files=list(self.files))


class DatasetWriter:
    """Writes a data set to ``dest`` (local folder or ``s3://``) under the rules of this module.

    Use as a context manager; :meth:`split` returns a :class:`SplitWriter`. The destination is
    checked when the writer is made, before any work."""

    def __init__(
        self,
        dest: str,
        card: DatasetCard,
        vocab: Vocabulary,
        *,
        max_words: int | None = None,
        overwrite: bool = False,
        log: Callable[[str], None] = print,
    ) -> None:
        if max_words is not None and not 1 <= max_words <= MAX_WORDS:
            raise DataError(f"max_words must lie in 1..{MAX_WORDS}, got {max_words}")
        self.dest, self.card, self.vocab, self.max_words = dest, card, vocab, max_words
        self.card.vocab_size, self.card.max_words = len(vocab), max_words
        self.card.tokenizer = tokenizer_id()  # the tokens column's ids depend on it
        self.schema = schema(
            card.regions, card.feature_dim, card.dtype, card.has_boxes, card.has_images
        )
        self.log = log
        self.target = destination.inspect(dest, overwrite, log)
        self.stage, self.prefix = self.target.stage()
        self.created: list[str] = []  # files this write made, relative to ``stage``
        self.checksums: dict[str, str] = {}
        self._splits: dict[str, SplitWriter] = {}

    def split(self, name: str, rows_per_file: int = 2000, row_group_rows: int = 128) -> SplitWriter:
        check_split_name(name, self.dest)
        if name in self._splits:
            raise DataError(f"split {name!r} is written twice")
        self._splits[name] = SplitWriter(self, name, rows_per_file, row_group_rows)
        return self._splits[name]

    def add_report(self, name: str, data: bytes) -> None:
        """A report file beside the data (e.g. ``bad_images.json``), listed in the card."""
        rel = f"{self.prefix}{name}"
        self.created.append(rel)
        self.checksums[rel] = put(fs.join(self.stage, rel), data)
        self.card.reports.append(rel)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            for w in self._splits.values():
                w.abort()
            self.target.discard(self.created)
            if exc is not None and fs.out_of_space(exc):  # one line naming the destination
                raise fs.write_error(exc, f"the data set {self.dest}") from None
            return
        try:
            self._finish()
        except OSError as e:
            if fs.out_of_space(e):
                raise fs.write_error(e, f"the data set {self.dest}") from None
            raise

    def _finish(self) -> None:
        try:
            self.card.splits = {name: w.close() for name, w in self._splits.items()}
            self.card.vocab = f"{self.prefix}{VOCAB}"
            self.created.append(self.card.vocab)
            vocab_bytes = json.dumps(self.vocab.to_json()).encode()
            self.checksums[self.card.vocab] = put(fs.join(self.stage, self.card.vocab), vocab_bytes)
            self.card.checksums = dict(sorted(self.checksums.items()))
            self.card.digest = digest(self.card.checksums)
            self.card.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.card.check(fs.join(self.dest, CARD))
        except BaseException:
            self.target.discard(self.created)
            raise
        self.target.commit(self.card, self.created, self.log)


def digest(checksums: dict[str, str]) -> str:
    """sha256 over the files' checksums: one value that changes with any byte of the data."""
    return hashlib.sha256(json.dumps(sorted(checksums.items())).encode()).hexdigest()
