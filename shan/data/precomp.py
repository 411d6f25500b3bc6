"""Convert a SCAN "precomp" folder (docs/model.md §10) to the project's format, streaming.

Source files per split: ``{split}_ims.npy`` (N, R, F) features, ``{split}_caps.txt`` with the
captions of image i on lines ``c*i .. c*i + c - 1`` (c = lines / N), and optionally
``{split}_ids.txt`` (one image id per line) and ``{split}_boxes.npy`` (N, R, 4). The folder's
``*vocab*.json`` is used when present, else the vocabulary is built from the train captions.
Features are memory-mapped and written chunk by chunk, so memory stays bounded.
"""

from __future__ import annotations

import mmap
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shan.data import destination
from shan.data.format import DataError, DatasetCard, check_split_name
from shan.data.writer import DatasetWriter, SplitWriter
from shan.progress import Progress
from shan.vocab import Vocabulary

SPLIT_ORDER = ("train", "dev", "test", "testall")


def _bounded_memory_pool() -> None:
    """Prefer jemalloc, which returns freed chunk buffers to the system promptly."""
    import pyarrow as pa

    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except (NotImplementedError, pa.ArrowNotImplementedError):
        pass


def find_splits(src: Path) -> list[str]:
    names = sorted(p.name[: -len("_ims.npy")] for p in src.glob("*_ims.npy"))
    return sorted(names, key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else 99, s))


def read_captions(path: Path) -> list[str]:
    """Lines of a caption file exactly as given (a final newline is optional)."""
    if not path.is_file():
        raise DataError(f"caption file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e
    text = text.removeprefix("\ufeff")  # a byte-order mark some editors write
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    lines = [line.rstrip("\r") for line in lines]
    for i, line in enumerate(lines):
        if not line.strip():
            raise DataError(f"{path}, line {i + 1}: empty caption")
    return lines


def load_npy(path: Path) -> np.ndarray:
    """A memory-mapped ``.npy`` array of numbers; pickled objects are refused, never loaded."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "Python objects" in str(e) or "allow_pickle" in str(e):
            raise DataError(
                f"{path}: holds pickled Python objects (refused: allow_pickle is off)"
            ) from None
        raise DataError(f"{path}: not a readable .npy array ({e})") from e
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy array ({e})") from e


def open_features(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"feature file {path} does not exist")
    ims = load_npy(path)
    if ims.ndim != 3:
        raise DataError(f"{path}: features must be (images, regions, dim), got shape {ims.shape}")
    if ims.dtype.kind != "f":
        raise DataError(f"{path}: features must be floating point, got dtype {ims.dtype}")
    return ims


def open_boxes(path: Path, n: int, regions: int) -> np.ndarray:
    """``{split}_boxes.npy``: (images, regions, 4) finite numbers."""
    boxes = load_npy(path)
    if boxes.shape != (n, regions, 4):
        raise DataError(f"{path}: boxes must be of shape ({n}, {regions}, 4), got {boxes.shape}")
    if boxes.dtype.kind not in "fiu":
        raise DataError(f"{path}: boxes must be numbers, got dtype {boxes.dtype}")
    return boxes


def release_pages(arr: np.ndarray) -> None:
    """Drop the pages of a memory-mapped array that were read, so that resident memory stays
    bounded by one chunk whatever the file's size (they are re-read from disk if needed)."""
    mm = getattr(arr, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)


def read_ids(path: Path, n: int) -> np.ndarray:
    if not path.is_file():
        return np.arange(n, dtype=np.int64)
    try:
        words = path.read_text(encoding="utf-8").split()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    ids = np.empty(len(words), dtype=np.int64)
    for i, word in enumerate(words):
        try:
            value = int(word)
        except ValueError:
            raise DataError(f"{path}, id {i + 1}: {word[:40]!r} is not an integer") from None
        if not -(2**63) <= value < 2**63:
            raise DataError(f"{path}, id {i + 1}: {word[:40]} does not fit in 64 bits")
        ids[i] = value
    if len(ids) != n:
        raise DataError(f"{path}: {len(ids)} ids for {n} images")
    return ids


def source_vocab(
    src: Path, vocab_path: str | None, splits: list[str], min_count: int
) -> tuple[Vocabulary, str]:
    if vocab_path is not None:
        return Vocabulary.load(vocab_path), str(vocab_path)
    found = sorted(src.glob("*vocab*.json"))
    if found:
        return Vocabulary.load(found[0]), found[0].name
    base = "train" if "train" in splits else splits[0]
    if base != "train":
        warnings.warn(f"no train split: building the vocabulary from {base}", stacklevel=2)
    caps = read_captions(src / f"{base}_caps.txt")
    return Vocabulary.build(caps, min_count), f"built from {base}_caps.txt (min count {min_count})"


def convert_precomp(
    src: str,
    dest: str,
    *,
    splits: list[str] | None = None,
    vocab_path: str | None = None,
    name: str | None = None,
    dtype: str = "float16",
    chunk_rows: int = 256,
    rows_per_file: int = 2000,
    max_words: int | None = None,
    min_count: int = 4,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    on_chunk: Callable[[int], None] | None = None,
) -> DatasetCard:
    """Convert ``splits`` (default: all found) of the precomp folder ``src`` to ``dest``.
    ``on_chunk(chunks written so far)`` is called after each chunk (progress, test hooks)."""
    _bounded_memory_pool()
    srcp = Path(src)
    if not srcp.is_dir():
        raise DataError(f"source folder {src} does not exist")
    destination.check_apart(srcp, dest)
    for option, value in (("chunk_rows", chunk_rows), ("rows_per_file", rows_per_file)):
        if value < 1:
            raise DataError(f"{option} must be at least 1, got {value}")
    if min_count < 1:
        raise DataError(f"min_count must be at least 1, got {min_count}")
    splits = list(splits or find_splits(srcp))
    if not splits:
        raise DataError(f"{src} holds no *_ims.npy file")
    for split in splits:
        check_split_name(split, f"--splits {split}")
    sources = {
        s: (open_features(srcp / f"{s}_ims.npy"), read_captions(srcp / f"{s}_caps.txt"))
        for s in splits
    }
    shapes = {ims.shape[1:] for ims, _ in sources.values()}
    if len(shapes) != 1:
        raise DataError(f"{src}: splits have different feature shapes {sorted(shapes)}")
    regions, feature_dim = shapes.pop()
    vocab, vocab_source = source_vocab(srcp, vocab_path, splits, min_count)
    with_boxes = [(srcp / f"{s}_boxes.npy").is_file() for s in splits]
    has_boxes = all(with_boxes)
    if any(with_boxes) and not has_boxes:
        missing = [f"{s}_boxes.npy" for s, b in zip(splits, with_boxes) if not b]
        raise DataError(
            f"{src}: boxes are given for some splits only ({', '.join(missing)} "
            "missing): give them for every split or none"
        )
    card = DatasetCard(
        name=name or srcp.name,
        regions=regions,
        feature_dim=feature_dim,
        dtype=dtype,
        has_boxes=has_boxes,
        source=f"converted from SCAN precomp folder {srcp.name}; vocabulary {vocab_source}",
    )
    inputs = {s: _split_inputs(srcp, s, *sources[s], has_boxes) for s in splits}
    chunks = 0

    def chunk_done() -> None:
        nonlocal chunks
        chunks += 1
        if on_chunk is not None:
            on_chunk(chunks)

    with DatasetWriter(dest, card, vocab, max_words=max_words, overwrite=overwrite, log=log) as out:
        for split in splits:
            writer = out.split(split, rows_per_file=rows_per_file)
            _convert_split(inputs[split], writer, chunk_rows=chunk_rows, done=chunk_done)
    return card


@dataclass(kw_only=True)
class _SplitInputs:
    """One split's sources, checked before writing."""

    split: str
    path: Path  # the features' file, named in errors
    ims: np.ndarray  # (N, R, F) memory-mapped
    caps: list[str]
    per: int  # captions per image
    ids: np.ndarray
    boxes: np.ndarray | None


def _split_inputs(
    srcp: Path, split: str, ims: np.ndarray, caps: list[str], has_boxes: bool
) -> _SplitInputs:
    n = ims.shape[0]
    if n == 0 or len(caps) % n:
        raise DataError(
            f"{srcp / f'{split}_caps.txt'}: {len(caps)} captions is not a multiple of the "
            f"{n} images in {split}_ims.npy"
        )
    ids = read_ids(srcp / f"{split}_ids.txt", n)
    boxes = open_boxes(srcp / f"{split}_boxes.npy", n, ims.shape[1]) if has_boxes else None
    return _SplitInputs(
        split=split, path=srcp / f"{split}_ims.npy", ims=ims, caps=caps, per=len(caps) // n,
        ids=ids, boxes=boxes,
    )  # fmt: skip


def _convert_split(
    inputs: _SplitInputs,
    writer: SplitWriter,
    *,
    chunk_rows: int,
    done: Callable[[], None],
) -> None:
    split, where, ims, caps = inputs.split, inputs.path, inputs.ims, inputs.caps
    per, ids, boxes = inputs.per, inputs.ids, inputs.boxes
    n = ims.shape[0]
    with Progress(f"convert {split}", n, "images") as progress:
        for r0 in range(0, n, chunk_rows):
            r1 = min(n, r0 + chunk_rows)
            chunk = np.asarray(ims[r0:r1])
            try:
                writer.write(
                    ids[r0:r1],
                    chunk,
                    [caps[i * per : (i + 1) * per] for i in range(r0, r1)],
                    boxes=None if boxes is None else np.asarray(boxes[r0:r1]),
                )
            except DataError as e:
                raise DataError(f"{where}: {e}") from e
            release_pages(ims)
            done()
            progress.update(r1 - r0)
        progress.summary = f"{len(caps)} captions ({per} per image)"
