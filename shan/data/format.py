"""The data set format: Parquet shards per split, a vocabulary and a dataset card.

Layout (see ``datasets/README.md`` for the schema table)::

    ROOT/dataset.json               the card; written last, so a folder without it is incomplete
    ROOT/vocab.json                 SCAN vocab format
    ROOT/<split>/part-00000.parquet one row per image, bounded row groups

The card lists every file with its sha256; on ``s3://`` the files of each write sit under a
prefix of their own (``ROOT/gen-<time>-<id>/...``). Writing is in ``shan.data.writer``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from shan.config import name_problem
from shan.data import fs
from shan.errors import DataError
from shan.vocab import MAX_WORDS, Vocabulary

FORMAT = "shan-parquet/1"
CARD = "dataset.json"
VOCAB = "vocab.json"
DTYPES = {"float16": np.float16, "float32": np.float32}
MAX_TOKENS = MAX_WORDS + 2  # token ids a caption holds at most: <start>, its words, <end>


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
    checksums: dict[str, str] = field(default_factory=dict)  # file -> sha256 of its bytes
    digest: str = ""  # sha256 over ``checksums``: the content's identity
    has_images: bool = False  # image_file, image_width, image_height columns present
    image_root: str = ""  # where image_file paths are relative to (folder or s3:// prefix)
    reports: list[str] = field(default_factory=list)  # e.g. bad_images.json
    tokenizer: str = ""  # shan.vocab.tokenizer_id() of the conversion; "" = not recorded (older)

    def files(self) -> list[str]:
        """Every file of the data set, relative to its root: vocabulary, shards, reports."""
        shards = (f for s in self.splits.values() for f in s.files)
        return [self.vocab, *shards, *self.reports]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> DatasetCard:
        try:
            data = json.loads(text)
            splits = {k: SplitInfo(**v) for k, v in data.pop("splits").items()}
            card = cls(**data, splits=splits)
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise DataError(f"{source}: not a valid dataset card ({e})") from e
        card.check(source)
        return card

    def check(self, source: str) -> None:
        """DataError naming ``source`` for a card that cannot describe a data set."""
        if self.format != FORMAT:
            raise DataError(f"{source}: format {self.format!r} is not {FORMAT!r}")
        if not self.splits:
            raise DataError(f"{source}: the card lists no split")
        for name, value in (("regions", self.regions), ("feature_dim", self.feature_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise DataError(f"{source}: {name} must be a positive integer, got {value!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            raise DataError(f"{source}: dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        for split, info in self.splits.items():
            if not isinstance(info.files, list) or not info.files:
                raise DataError(f"{source}: split {split!r} lists no file")
            for key in ("images", "captions"):
                value = getattr(info, key)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise DataError(f"{source}: split {split!r}: {key} {value!r} is not a count")
        if not isinstance(self.checksums, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.checksums.items()
        ):
            raise DataError(f"{source}: checksums must map file names to sha256 strings")
        if self.has_images and not (isinstance(self.image_root, str) and self.image_root):
            raise DataError(f"{source}: has_images is true but image_root is empty")
        if not isinstance(self.reports, list):
            raise DataError(f"{source}: reports must be a list of files")
        for f in [*self.files(), *self.checksums]:
            check_relative(f, source)
            if f == CARD:
                raise DataError(f"{source}: the card lists itself ({CARD}) as a data file")


def check_split_name(name: object, where: str) -> None:
    """A split name becomes a folder of the data set: a name, never a path."""
    problem = name_problem(name)
    if problem:
        raise DataError(f"{where}: split name {problem}")


def check_relative(path: object, source: str) -> None:
    """A file named by a card must stay inside the data set: relative, no ``..``."""
    if not isinstance(path, str) or not path:
        raise DataError(f"{source}: file name {path!r} is not a path")
    parts = path.replace("\\", "/").split("/")
    if path.startswith(("/", "\\")) or "://" in path or ":" in parts[0] or ".." in parts:
        raise DataError(f"{source}: file {path!r} leaves the data set (absolute or with '..')")


IMAGE_COLUMNS = ("image_file", "image_width", "image_height")


def schema(
    regions: int, feature_dim: int, dtype: str, boxes: bool, images: bool = False
) -> pa.Schema:
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
    if images:
        fields += [
            pa.field("image_file", pa.string(), nullable=False),
            pa.field("image_width", pa.int32(), nullable=False),
            pa.field("image_height", pa.int32(), nullable=False),
        ]
    return pa.schema(fields)


def image_uri(card: DatasetCard, file: str) -> str:
    """Where the image ``file`` of a row is: ``image_root`` joined with it."""
    return fs.join(card.image_root, file)


def load_card(root: str) -> DatasetCard:
    """Read ``ROOT/dataset.json``; a clear error when the data set is missing or incomplete."""
    path = fs.join(root, CARD)
    try:
        text = fs.read_bytes(path)
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
    try:
        data = json.loads(fs.read_bytes(path))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    return Vocabulary.from_json(data, source=path)


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
    *,
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
    check_num_regions(where, first_row, num_regions, features.shape[1])
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


def check_num_regions(where: str, first_row: int, num_regions: np.ndarray, regions: int) -> None:
    """DataError naming ``where``, the row and the value when a row's ``num_regions`` (N,) is
    not in 1..``regions`` (the features' R): its features would be read past their end."""
    counts = np.asarray(num_regions)
    wrong = (counts < 1) | (counts > regions)
    if wrong.any():
        r = int(np.flatnonzero(wrong)[0])
        raise DataError(
            f"{where}: row {first_row + r}: num_regions {counts[r]} not in 1..{regions}"
        )


def check_tokens(where: str, first_row: int, tokens: list[list[list[int]]]) -> None:
    """DataError naming ``where``, the row and the caption when a caption's token ids (per
    row, per caption) are more than the format's :data:`MAX_TOKENS`."""
    for r, caps in enumerate(tokens):
        for j, t in enumerate(caps):
            if len(t) > MAX_TOKENS:
                raise DataError(
                    f"{where}: row {first_row + r}: caption {j} has {len(t) - 2:,} words, more "
                    f"than the format's {MAX_WORDS:,}"
                )
