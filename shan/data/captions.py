"""Caption files for ``shan data images``: which captions belong to which image file,
and in which split.

Three formats, by extension:

- ``.csv``: a header row with columns ``image`` and ``caption``, optionally ``split``;
- ``.jsonl`` (or ``.json``, one object a line): keys ``image``, ``caption``, optionally
  ``split``;
- ``.txt``: a SCAN caption file, one caption a line, with an image list (one file name a
  line): the captions of image i are lines ``c*i .. c*i + c - 1`` (c = captions / images).

A ``split`` column names each row's split; without one every row goes to the split given
(``--split``, default ``train``). Image names are paths relative to the images' folder.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from shan.data import fs
from shan.data.format import DataError, check_split_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# (line, image, caption, split, whether the file has a split column)
_Row = tuple[int, str | None, str | None, str | None, bool]


@dataclass
class ImageCaptions:
    """One image of a split: its file, its captions, and where it was first named."""

    file: str
    captions: list[str] = field(default_factory=list)
    where: str = ""  # "FILE, line N": for errors about the image


def _text(path: str) -> str:
    try:
        data = fs.read_bytes(path)
    except fs.StorageError as e:
        raise DataError(f"--captions {path}: {e}") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _rows_csv(path: str, text: str) -> Iterator[_Row]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        yield from _csv_rows(path, reader)
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None


def _csv_rows(path: str, reader: csv.DictReader[str]) -> Iterator[_Row]:
    names = reader.fieldnames or []
    for col in ("image", "caption"):
        if col not in names:
            raise DataError(f"{path}: no {col!r} column in the header (it has {names})")
    has_split = "split" in names
    for row in reader:
        yield reader.line_num, row.get("image"), row.get("caption"), row.get("split"), has_split


def _rows_jsonl(path: str, text: str) -> Iterator[_Row]:
    has_split = None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}, line {n}: not a JSON object")
        for key in ("image", "caption"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{path}, line {n}: no {key!r} string")
        if has_split is None:
            has_split = "split" in obj
        elif has_split != ("split" in obj):
            raise DataError(f"{path}, line {n}: 'split' must be given on every line or none")
        yield n, obj["image"], obj["caption"], obj.get("split"), has_split


def _rows_scan(path: str, text: str, image_list: str | None) -> Iterator[_Row]:
    if image_list is None:
        raise DataError(
            f"--captions {path} is a SCAN caption file (.txt): give --image-list, one image "
            "file a line"
        )
    caps = text.split("\n")
    if caps and caps[-1] == "":
        caps.pop()
    files = [f.strip() for f in _text(image_list).splitlines() if f.strip()]
    if not files or len(caps) % len(files):
        raise DataError(
            f"{path}: {len(caps)} captions is not a multiple of the {len(files)} images in "
            f"{image_list}"
        )
    per = len(caps) // len(files)
    for i, cap in enumerate(caps):
        yield i + 1, files[i // per], cap.rstrip("\r"), None, False


def read_captions(
    path: str, split: str | None = None, image_list: str | None = None
) -> dict[str, dict[str, ImageCaptions]]:
    """{split: {image file: ImageCaptions}}, images in order of first mention."""
    text = _text(path)
    lower = path.lower()
    if lower.endswith(".csv"):
        rows = _rows_csv(path, text)
    elif lower.endswith((".jsonl", ".json")):
        rows = _rows_jsonl(path, text)
    elif lower.endswith(".txt"):
        rows = _rows_scan(path, text, image_list)
    else:
        raise DataError(f"--captions {path}: expected a .csv, .jsonl or SCAN .txt caption file")
    out: dict[str, dict[str, ImageCaptions]] = {}
    for line, image, caption, row_split, has_split in rows:
        where = f"{path}, line {line}"
        if has_split and split is not None:
            raise DataError(
                f"{path} names a split on each row: drop --split (it is for files without one)"
            )
        name = (row_split or "").strip() if has_split else (split or "train")
        if not name:
            raise DataError(f"{where}: empty split")
        check_split_name(name, where)
        if not image or not image.strip():
            raise DataError(f"{where}: empty image name")
        if caption is None or not caption.strip():
            raise DataError(f"{where}: empty caption")
        image = image.strip()
        if not image.lower().endswith(IMAGE_SUFFIXES):
            raise DataError(f"{where}: image {image!r} is not a .jpg, .jpeg or .png file")
        entry = out.setdefault(name, {}).setdefault(image, ImageCaptions(image, where=where))
        entry.captions.append(caption)
    if not out:
        raise DataError(f"{path}: holds no caption")
    return out
