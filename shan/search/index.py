"""The image index of a split for a model: every caption-independent image-side tensor of the
scorer (:class:`shan.model.EncodedImages`), computed once and cached in a file.

The cache file is ``DIR/index-<key>.pt``; the key (:func:`shan.fingerprint.index_key`) is a
digest of the checkpoint's files, the data's fingerprint (its card and a digest of the arrays)
and the split, so a changed model or data set never reuses a stale index. A file is written
under a temporary name and renamed into place (never half-written); a file at the index's name
that is not that index is refused, never overwritten.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from shan.data import fs
from shan.data.fs import write_error
from shan.errors import JobError
from shan.fingerprint import INDEX_FORMAT
from shan.progress import Progress

if TYPE_CHECKING:
    from shan.model import SHAN, EncodedImages

FORMAT = INDEX_FORMAT  # the file format, part of the key (shan.fingerprint.index_key)
TENSORS = ("v", "mask", "vp", "vg", "pv")  # EncodedImages' fields, in order


@dataclass
class ImageIndex:
    """A split's images, encoded: ``images`` (N rows of :class:`EncodedImages`: v, vp, pv
    (N, k, d), vg (N, k, 2d), mask (N, k)) on CPU in float32, ``image_ids`` (N,) and the key."""

    images: EncodedImages
    image_ids: np.ndarray
    key: str

    def __len__(self) -> int:
        return len(self.image_ids)


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"index-{key}.pt"


def save_index(path: Path, index: ImageIndex) -> None:
    """Write ``index`` to ``path`` atomically (:func:`shan.data.fs.write_atomic`)."""
    import torch

    payload = {
        "format": FORMAT,
        "key": index.key,
        "image_ids": torch.tensor(np.asarray(index.image_ids, dtype=np.int64)),
        **{f: getattr(index.images, f) for f in TENSORS},
    }
    buf = io.BytesIO()  # torch.save to a file hides a full disk in a RuntimeError
    torch.save(payload, buf)
    fs.write_atomic(path, buf.getvalue())


def load_index(path: Path, key: str, n_images: int) -> ImageIndex:
    """The index stored at ``path``; JobError naming the file when it is not the index of
    ``key`` with ``n_images`` rows (a foreign or damaged file is never used or replaced)."""
    import torch

    from shan.model import EncodedImages

    refuse = (
        f"{path} is not the search index it is named after ({{}}); it is left alone: remove "
        "it or give another --cache"
    )
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise JobError(refuse.format(f"unreadable: {' '.join(str(e).split())[:120]}")) from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != key:
        raise JobError(refuse.format("another format or key"))
    tensors = [data.get(f) for f in (*TENSORS, "image_ids")]
    if not all(isinstance(t, torch.Tensor) and len(t) == n_images for t in tensors):
        raise JobError(refuse.format(f"not {n_images} rows of every tensor"))
    checked = [t for t in tensors if isinstance(t, torch.Tensor)]  # all of them (for mypy)
    images = EncodedImages(*checked[:-1])
    if not all(bool(torch.isfinite(getattr(images, f)).all()) for f in TENSORS if f != "mask"):
        raise JobError(refuse.format("it holds NaN or infinite values"))
    return ImageIndex(images, checked[-1].numpy(), key)


def cache_problem(cache_dir: str) -> str | None:
    """Why ``cache_dir`` cannot be the folder of the indexes; None when it can."""
    if "://" in cache_dir:
        return f"--cache {cache_dir}: the index cache must be a local folder"
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        return f"--cache {cache_dir} is a file, not a folder"
    return None


def check_cache_dir(cache_dir: str) -> Path:
    """``cache_dir`` as a local folder (created); JobError when it cannot be one."""
    why = cache_problem(cache_dir)
    if why is not None:
        raise JobError(why)
    path = Path(cache_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"--cache {cache_dir}: cannot create it ({e.strerror})") from e
    return path


def image_index(
    model: SHAN,
    features: np.ndarray,
    num_regions: np.ndarray,
    image_ids: np.ndarray,
    *,
    key: str,
    cache_dir: str,
    log: Callable[[str], None] = print,
) -> tuple[ImageIndex, bool]:
    """The index of ``key``: loaded from ``cache_dir`` when there, else encoded (features
    (N, k, F), num_regions (N,), image_ids (N,)) and cached. Returns (index, built)."""
    from shan.scoring import encode_images  # torch: only once the inputs are checked

    path = cache_path(check_cache_dir(cache_dir), key)
    if path.exists():
        index = load_index(path, key, len(image_ids))
        if not np.array_equal(index.image_ids, np.asarray(image_ids)):
            raise JobError(f"{path}: its image ids are not the split's; remove it")
        log(f"image index: {len(index)} images from {path}")
        return index, False
    with Progress("encode images", len(image_ids), "images") as progress:  # on stderr
        device = next(model.parameters()).device
        images = encode_images(model, features, num_regions, device, report=progress.update)
    index = ImageIndex(images, np.asarray(image_ids, dtype=np.int64), key)
    try:
        save_index(path, index)
    except OSError as e:
        raise write_error(e, f"the image index {path}") from None
    log(f"image index: {len(index)} images encoded, cached in {path}")
    return index, True


__all__ = [
    "FORMAT",
    "ImageIndex",
    "cache_path",
    "cache_problem",
    "image_index",
    "load_index",
    "save_index",
]
