"""The image index of a split for a model: every caption-independent image-side tensor of the
scorer (:class:`shan.model.EncodedImages`), computed once and cached in a file.

The cache file is ``DIR/index-<key>.pt``; the key is a digest of the checkpoint's files, the
data's fingerprint (its card and a digest of the arrays) and the split, so a changed model or
data set never reuses a stale index. A file is written under a temporary name and renamed into
place (never half-written); a file at the index's name that is not that index is refused,
never overwritten.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from shan.data.fs import write_error
from shan.errors import JobError
from shan.progress import Progress

if TYPE_CHECKING:
    import torch

    from shan.model import SHAN, EncodedImages

FORMAT = "shan-search-index/1"
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


def index_key(model_files: dict[str, str], data_fp: str, split: str) -> str:
    """The cache key: sha256 over the format, every checkpoint file's digest (name -> sha256),
    the data fingerprint and the split name."""
    h = hashlib.sha256(FORMAT.encode())
    for name, digest in sorted(model_files.items()):
        h.update(f"\0file\0{name}\0{digest}".encode())
    h.update(f"\0data\0{data_fp}\0split\0{split}".encode())
    return h.hexdigest()


def cache_path(cache_dir: str | Path, key: str) -> Path:
    return Path(cache_dir) / f"index-{key}.pt"


def encode_split_images(
    model: SHAN,
    features: np.ndarray,
    num_regions: np.ndarray,
    chunk: int = 256,
    report: Callable[[int], None] | None = None,
) -> EncodedImages:
    """features (N, k, F), num_regions (N,) -> the N images encoded (float32, CPU), ``chunk``
    images at a time through :meth:`SHAN.encode_images`; ``report`` gets each chunk's size."""
    import torch

    from shan.model import EncodedImages

    model.eval()
    device = next(model.parameters()).device
    parts: list[EncodedImages] = []
    with torch.no_grad():
        for i0 in range(0, len(features), chunk):
            feats = torch.from_numpy(np.array(features[i0 : i0 + chunk], dtype=np.float32))
            counts = torch.from_numpy(np.array(num_regions[i0 : i0 + chunk]))
            im = model.encode_images(feats.to(device), counts.to(device))
            parts.append(EncodedImages(*(_cpu32(getattr(im, f)) for f in TENSORS)))
            if report is not None:
                report(len(feats))
    return EncodedImages(*(torch.cat([getattr(p, f) for p in parts]) for f in TENSORS))


def _cpu32(x: torch.Tensor) -> torch.Tensor:
    import torch

    return x.cpu() if x.dtype == torch.bool else x.float().cpu()


def save_index(path: Path, index: ImageIndex) -> None:
    """Write ``index`` to ``path`` atomically (a temporary file in the same folder, renamed)."""
    import torch

    payload = {
        "format": FORMAT,
        "key": index.key,
        "image_ids": torch.tensor(np.asarray(index.image_ids, dtype=np.int64)),
        **{f: getattr(index.images, f) for f in TENSORS},
    }
    buf = io.BytesIO()  # torch.save to a file hides a full disk in a RuntimeError
    torch.save(payload, buf)
    write_atomically(path, lambda f: f.write(buf.getbuffer()))


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` into a temporary file beside ``path``, synced, then renamed to ``path``: a
    reader never sees half a file, and a failure leaves only what was there."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would survive the rename
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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


def check_cache_dir(cache_dir: str) -> Path:
    """``cache_dir`` as a local folder (created); JobError when it cannot be one."""
    if "://" in cache_dir:
        raise JobError(f"--cache {cache_dir}: the index cache must be a local folder")
    path = Path(cache_dir)
    if path.exists() and not path.is_dir():
        raise JobError(f"--cache {cache_dir} is a file, not a folder")
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
    path = cache_path(check_cache_dir(cache_dir), key)
    if path.exists():
        index = load_index(path, key, len(image_ids))
        if not np.array_equal(index.image_ids, np.asarray(image_ids)):
            raise JobError(f"{path}: its image ids are not the split's; remove it")
        log(f"image index: {len(index)} images from {path}")
        return index, False
    with Progress("encode images", len(image_ids), "images") as progress:  # on stderr
        images = encode_split_images(model, features, num_regions, report=progress.update)
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
    "encode_split_images",
    "image_index",
    "index_key",
    "load_index",
    "save_index",
]
