"""The data set format: Parquet shards per split, a vocabulary and a dataset card.

Layout (see ``datasets/README.md`` for the schema table)::

    ROOT/dataset.json               the card; written last, so a folder without it is incomplete
    ROOT/vocab.json                 SCAN vocab format
    ROOT/<split>/part-00000.parquet one row per image, bounded row groups
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shan.data import fs
from shan.vocab import Vocabulary

FORMAT = "shan-parquet/1"
CARD = "dataset.json"
VOCAB = "vocab.json"
DTYPES = {"float16": np.float16, "float32": np.float32}


class DataError(ValueError):
    """A data set, or a source being converted, is malformed; the message names where."""


@dataclass
class SplitInfo:
    images: int
    captions: int
    files: list[str]


@dataclass
class DatasetCard:
    """What ``dataset.json`` holds."""

    name: str
    regions: int
    feature_dim: int
    dtype: str = "float16"
    has_boxes: bool = False
    variable_regions: bool = False
    vocab_size: int = 0
    max_words: int | None = None
    splits: dict[str, SplitInfo] = field(default_factory=dict)
    source: str = ""
    created: str = ""
    format: str = FORMAT
    vocab: str = VOCAB

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str) -> DatasetCard:
        try:
            data = json.loads(text)
            splits = {k: SplitInfo(**v) for k, v in data.pop("splits").items()}
            card = cls(**data, splits=splits)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{source}: not a valid dataset card ({e})") from e
        if card.format != FORMAT:
            raise DataError(f"{source}: format {card.format!r} is not {FORMAT!r}")
        return card


def schema(regions: int, feature_dim: int, dtype: str, boxes: bool) -> pa.Schema:
    value = pa.float16() if dtype == "float16" else pa.float32()
    fields = [
        pa.field("image_id", pa.int64(), nullable=False),
        pa.field("features", pa.fixed_shape_tensor(value, [regions, feature_dim])),
        pa.field("num_regions", pa.int32(), nullable=False),
        pa.field("captions", pa.list_(pa.string())),
        pa.field("tokens", pa.list_(pa.list_(pa.int32()))),
    ]
    if boxes:
        fields.insert(3, pa.field("boxes", pa.fixed_shape_tensor(pa.float32(), [regions, 4])))
    return pa.schema(fields)


def load_card(root: str) -> DatasetCard:
    """Read ``ROOT/dataset.json``; a clear error when the data set is missing or incomplete."""
    path = fs.join(root, CARD)
    try:
        text = fs.read_bytes(path).decode()
    except fs.StorageError as e:
        if fs.is_remote(root) or Path(root).exists():
            raise DataError(
                f"{root} is not a complete data set: {e} (an interrupted write leaves no card)"
            ) from e
        raise DataError(f"data set {root} does not exist") from e
    return DatasetCard.from_json(text, path)


def load_vocab(root: str, card: DatasetCard | None = None) -> Vocabulary:
    card = card or load_card(root)
    path = fs.join(root, card.vocab)
    return Vocabulary.from_json(json.loads(fs.read_bytes(path)), source=path)


def split_files(root: str, card: DatasetCard, split: str) -> list[str]:
    if split not in card.splits:
        raise DataError(f"{root} has no split {split!r}; it has {', '.join(card.splits)}")
    return [fs.join(root, f) for f in card.splits[split].files]


# -- checks shared by the writer and the validator -----------------------------------------------
def check_rows(
    where: str,
    first_row: int,
    image_ids: np.ndarray,
    features: np.ndarray,
    num_regions: np.ndarray,
    captions: list[list[str]],
    seen_ids: set[int],
) -> None:
    """Raise DataError naming ``where`` and the row for any bad value in a chunk of rows."""
    bad = ~np.isfinite(features.reshape(len(features), -1)).all(axis=1)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise DataError(
            f"{where}: row {first_row + r} (image id {int(image_ids[r])}) has NaN or infinite "
            "features (after conversion to the stored dtype)"
        )
    k = features.shape[1]
    wrong = (num_regions < 1) | (num_regions > k)
    if wrong.any():
        r = int(np.flatnonzero(wrong)[0])
        raise DataError(f"{where}: row {first_row + r}: num_regions {num_regions[r]} not in 1..{k}")
    for r, (iid, caps) in enumerate(zip(image_ids.tolist(), captions)):
        if iid in seen_ids:
            raise DataError(f"{where}: row {first_row + r}: duplicate image id {iid}")
        seen_ids.add(iid)
        if not caps:
            raise DataError(f"{where}: row {first_row + r} (image id {iid}) has no caption")
        for j, c in enumerate(caps):
            if c is None or not c.strip():
                raise DataError(
                    f"{where}: row {first_row + r} (image id {iid}): caption {j} is empty"
                )


# -- writing --------------------------------------------------------------------------------------
class SplitWriter:
    """Writes one split as shards of at most ``rows_per_file`` rows, row groups of
    ``row_group_rows``; checks every chunk before it is written."""

    def __init__(self, ds: DatasetWriter, split: str, rows_per_file: int, row_group_rows: int):
        self.ds, self.split = ds, split
        self.rows_per_file, self.row_group_rows = rows_per_file, row_group_rows
        self.files: list[str] = []
        self.images = self.captions = 0
        self.seen: set[int] = set()
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_file = 0

    def _open(self) -> None:
        rel = f"{self.split}/part-{len(self.files):05d}.parquet"
        self.files.append(rel)
        filesystem, path = fs.filesystem(fs.join(self.ds.stage, rel))
        if not fs.is_remote(self.ds.stage):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(
            path,
            self.ds.schema,
            filesystem=filesystem,
            compression="zstd",
            use_dictionary=["image_id"],
            write_statistics=["image_id", "num_regions"],
            use_byte_stream_split=["features.list.element"],
        )
        self._rows_in_file = 0

    def write(
        self,
        image_ids: np.ndarray,
        features: np.ndarray,
        captions: list[list[str]],
        num_regions: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
    ) -> None:
        """features (B, R, F); captions: B lists of strings; num_regions (B,) or None (all)."""
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
            check_rows(self.split, self.images, image_ids, feats, num_regions, captions, self.seen)
        tokens = [[self.ds.vocab.encode(c, self.ds.max_words) for c in caps] for caps in captions]
        columns = {
            "image_id": pa.array(image_ids),
            "features": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(feats)),
            "num_regions": pa.array(num_regions),
            "captions": pa.array(captions, type=pa.list_(pa.string())),
            "tokens": pa.array(tokens, type=pa.list_(pa.list_(pa.int32()))),
        }
        if card.has_boxes:
            if boxes is None:
                raise DataError(f"{self.split}: the data set has boxes but none were given")
            b = np.ascontiguousarray(boxes, dtype=np.float32)
            columns["boxes"] = pa.FixedShapeTensorArray.from_numpy_ndarray(b)
        table = pa.table(columns, schema=self.ds.schema)
        start = 0
        while start < len(table):
            if self._writer is None or self._rows_in_file >= self.rows_per_file:
                self._close_file()
                self._open()
            take = min(self.rows_per_file - self._rows_in_file, len(table) - start)
            self._writer.write_table(table.slice(start, take), row_group_size=self.row_group_rows)
            self._rows_in_file += take
            start += take
        self.images += len(table)
        self.captions += sum(len(c) for c in captions)

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> SplitInfo:
        self._close_file()
        if self.images == 0:
            raise DataError(f"split {self.split!r} has no rows")
        return SplitInfo(images=self.images, captions=self.captions, files=list(self.files))


class DatasetWriter:
    """Writes a data set so that an interrupted write never looks complete.

    Local: everything goes to a hidden staging folder beside ``dest``, renamed at the end.
    ``s3://``: files are written in place and the card last; on error they are deleted.
    Use as a context manager; :meth:`split` returns a :class:`SplitWriter`.
    """

    def __init__(
        self,
        dest: str,
        card: DatasetCard,
        vocab: Vocabulary,
        max_words: int | None = None,
        overwrite: bool = False,
    ):
        self.dest, self.card, self.vocab, self.max_words = dest, card, vocab, max_words
        self.card.vocab_size, self.card.max_words = len(vocab), max_words
        self.schema = schema(card.regions, card.feature_dim, card.dtype, card.has_boxes)
        fs.check_writable(dest)
        if fs.exists(fs.join(dest, CARD)) and not overwrite:
            raise DataError(f"{dest} already holds a data set (pass overwrite to replace it)")
        if fs.is_remote(dest):
            fs.delete_tree(fs.join(dest, CARD))  # an overwritten data set is incomplete until done
            self.stage = dest
        else:
            p = Path(dest).absolute()
            self.stage = str(p.parent / f".{p.name}.partial-{uuid.uuid4().hex[:8]}")
        self._splits: dict[str, SplitWriter] = {}

    def split(self, name: str, rows_per_file: int = 2000, row_group_rows: int = 128):
        if name in self._splits:
            raise DataError(f"split {name!r} is written twice")
        self._splits[name] = SplitWriter(self, name, rows_per_file, row_group_rows)
        return self._splits[name]

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for w in self._splits.values():
                try:
                    w._close_file()
                except Exception:
                    pass
            if fs.is_remote(self.dest):
                for w in self._splits.values():
                    for f in w.files:
                        fs.delete_tree(fs.join(self.dest, f))
            else:
                shutil.rmtree(self.stage, ignore_errors=True)
            return
        self._finish()

    def _finish(self) -> None:
        self.card.splits = {name: w.close() for name, w in self._splits.items()}
        self.card.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if not fs.is_remote(self.dest):
            Path(self.stage).mkdir(parents=True, exist_ok=True)
        fs.write_bytes(fs.join(self.stage, VOCAB), json.dumps(self.vocab.to_json()).encode())
        fs.write_bytes(fs.join(self.stage, CARD), self.card.to_json().encode())
        if not fs.is_remote(self.dest):
            dest = Path(self.dest).absolute()
            if dest.exists():
                old = dest.parent / f".{dest.name}.old-{os.getpid()}"
                dest.rename(old)
                shutil.rmtree(old, ignore_errors=True)
            Path(self.stage).rename(dest)
