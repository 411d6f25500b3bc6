"""Check a data set end to end and summarise it (``shan data validate``)."""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shan.data import fs
from shan.data.format import (
    IMAGE_COLUMNS,
    DataError,
    DatasetCard,
    check_rows,
    check_tokens,
    load_card,
    load_vocab,
    split_files,
)

REQUIRED = ("image_id", "features", "num_regions", "captions", "tokens")


def _open(path: str) -> pq.ParquetFile:
    filesystem, p = fs.filesystem(path)
    try:
        return pq.ParquetFile(filesystem.open_input_file(p))
    except FileNotFoundError:
        raise DataError(f"{path} does not exist (listed in the dataset card)") from None
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e


def _check_schema(path: str, schema: pa.Schema, card: DatasetCard) -> None:
    needed = REQUIRED + (IMAGE_COLUMNS if card.has_images else ())
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise DataError(f"{path}: missing column {missing[0]!r}")
    ftype = schema.field("features").type
    shape = list(getattr(ftype, "shape", []))
    if not isinstance(ftype, pa.FixedShapeTensorType) or shape != [card.regions, card.feature_dim]:
        raise DataError(
            f"{path}: column 'features' is {ftype}, expected a fixed-shape tensor "
            f"[{card.regions}, {card.feature_dim}] as the card says"
        )
    want = pa.float16() if card.dtype == "float16" else pa.float32()
    if ftype.value_type != want:
        raise DataError(f"{path}: features are {ftype.value_type}, the card says {card.dtype}")


def validate_split(root: str, split: str, card: DatasetCard, vocab_size: int) -> dict[str, Any]:
    seen: set[int] = set()
    images = captions = 0
    regions: list[np.ndarray] = []
    lengths: list[int] = []
    for path in split_files(root, card, split):
        pf = _open(path)
        _check_schema(path, pf.schema_arrow, card)
        try:
            for batch in pf.iter_batches(batch_size=256):
                n = _check_batch(path, batch, images, seen, vocab_size)
                if card.has_images:
                    _check_images(path, batch, images, card.has_boxes)
                regions.append(batch.column("num_regions").to_numpy())
                lengths.extend(len(t) for ts in batch.column("tokens").to_pylist() for t in ts)
                captions += n
                images += batch.num_rows
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: cannot be read to the end ({e})") from e
    info = card.splits[split]
    if (images, captions) != (info.images, info.captions):
        raise DataError(
            f"{root}/{split}: holds {images} images and {captions} captions, the card says "
            f"{info.images} and {info.captions}"
        )
    r, ln = np.concatenate(regions), np.array(lengths)
    return {
        "images": images,
        "captions": captions,
        "regions": {"min": int(r.min()), "mean": float(r.mean()), "max": int(r.max())},
        "caption_tokens": {
            "min": int(ln.min()),
            "mean": float(ln.mean()),
            "median": float(np.median(ln)),
            "max": int(ln.max()),
        },
    }


def _check_batch(
    path: str, batch: pa.RecordBatch, first: int, seen: set[int], vocab_size: int
) -> int:
    feats = batch.column("features").to_numpy_ndarray()
    ids = batch.column("image_id").to_numpy()
    caps = batch.column("captions").to_pylist()
    toks = batch.column("tokens").to_pylist()
    regions = batch.column("num_regions").to_numpy()
    with np.errstate(invalid="ignore"):
        check_rows(path, first, ids, feats, regions, captions=caps, seen_ids=seen)
    check_tokens(path, first, toks)
    for r, (c, t) in enumerate(zip(caps, toks)):
        if len(c) != len(t):
            raise DataError(f"{path}: row {first + r}: {len(c)} captions but {len(t)} token lists")
        for ids_ in t:
            if not ids_ or min(ids_) < 0 or max(ids_) >= vocab_size:
                raise DataError(f"{path}: row {first + r}: token ids outside the vocabulary")
    return sum(len(c) for c in caps)


def _check_images(path: str, batch: pa.RecordBatch, first: int, has_boxes: bool) -> None:
    """image_file set, width and height at least 1, boxes inside the image (1 px slack)."""
    files = batch.column("image_file").to_pylist()
    w = batch.column("image_width").to_numpy(zero_copy_only=False)
    h = batch.column("image_height").to_numpy(zero_copy_only=False)
    for r, f in enumerate(files):
        if not f:
            raise DataError(f"{path}: row {first + r}: empty image_file")
        if not (w[r] >= 1 and h[r] >= 1):
            raise DataError(f"{path}: row {first + r} ({f}): image size {w[r]}x{h[r]}")
    if not has_boxes:
        return
    boxes = batch.column("boxes").to_numpy_ndarray()
    counts = batch.column("num_regions").to_numpy()
    for r in range(len(files)):
        b = boxes[r, : counts[r]]
        limit = np.array([w[r], h[r], w[r], h[r]]) + 1.0
        if (b < -1.0).any() or (b > limit).any() or (b[:, 2:] < b[:, :2]).any():
            raise DataError(
                f"{path}: row {first + r} ({files[r]}): a box outside the "
                f"{w[r]}x{h[r]} image or with x2 < x1 or y2 < y1"
            )


def check_checksums(root: str, card: DatasetCard) -> None:
    """Every file's bytes against the sha256 the card lists (cards from before checksums have
    none to check)."""
    for rel, want in card.checksums.items():
        path = fs.join(root, rel)
        filesystem, p = fs.filesystem(path)
        sha = hashlib.sha256()
        try:
            with filesystem.open_input_stream(p) as f:
                while chunk := f.read(1 << 22):
                    sha.update(chunk)
        except FileNotFoundError:
            raise DataError(f"{path} does not exist (listed in the dataset card)") from None
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e})") from e
        if sha.hexdigest() != want:
            raise DataError(f"{path}: its content differs from the card's checksum (changed?)")


def validate(root: str) -> dict[str, Any]:
    """Validate every split of the data set at ``root``; returns a summary dict."""
    card = load_card(root)
    vocab = load_vocab(root, card)
    if len(vocab) != card.vocab_size:
        raise DataError(f"{root}: vocab has {len(vocab)} words, the card says {card.vocab_size}")
    splits = {s: validate_split(root, s, card, len(vocab)) for s in card.splits}
    check_checksums(root, card)  # last: a file that does not parse gets the more exact error
    return {
        "name": card.name,
        "feature_shape": [card.regions, card.feature_dim],
        "dtype": card.dtype,
        "boxes": card.has_boxes,
        "images": card.image_root if card.has_images else None,
        "reports": card.reports,
        "vocab_size": len(vocab),
        "digest": card.digest,
        "splits": splits,
    }


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"data set {summary['name']}: features {summary['feature_shape']} {summary['dtype']}, "
        f"boxes {'yes' if summary['boxes'] else 'no'}, vocabulary {summary['vocab_size']} words",
        f"{'split':<10}{'images':>9}{'captions':>10}{'regions':>16}{'tokens/caption':>26}",
    ]
    for name, s in summary["splits"].items():
        r, t = s["regions"], s["caption_tokens"]
        lines.append(
            f"{name:<10}{s['images']:>9}{s['captions']:>10}"
            f"{r['min']:>6}/{r['mean']:.1f}/{r['max']:<4}"
            f"{t['min']:>8} / {t['mean']:.1f} / {t['median']:.0f} / {t['max']:<4}"
        )
    lines.append(
        "(regions: min/mean/max; tokens with <start> and <end>: min / mean / median / max)"
    )
    if summary.get("images"):
        lines.append(f"images at {summary['images']}")
    for report in summary.get("reports") or []:
        lines.append(f"report: {report}")
    return "\n".join(lines)
