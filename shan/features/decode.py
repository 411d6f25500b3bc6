"""Reading and decoding images for the extractors (Pillow): a bad image is an error string on
its row, never an exception, so the driver decides (skip or stop) and names the image."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from shan.data import fs


def decode(
    data: bytes, size: int, letterbox: bool, min_side: int
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int], str]:
    """One image's bytes -> (pixels (size, size, 3) uint8, (width, height), scaled (w, h),
    error: "" when fine). ``letterbox``: keep the aspect ratio, longer side ``size``, in the
    top-left corner; else stretched to ``size x size``."""
    from PIL import Image

    blank = np.zeros((size, size, 3), np.uint8)
    if not data:
        return blank, (0, 0), (0, 0), "empty file (0 bytes)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                rgb = im.convert("RGB")
    except Exception as e:  # Pillow raises many types for a damaged file
        return blank, (0, 0), (0, 0), f"cannot be decoded as an image ({type(e).__name__}: {e})"
    w, h = rgb.size
    if min(w, h) < min_side:
        return blank, (w, h), (0, 0), f"{w}x{h} pixels, smaller than --min-side {min_side}"
    if not letterbox:
        return (
            np.asarray(rgb.resize((size, size), Image.Resampling.BILINEAR)),
            (w, h),
            (size, size),
            "",
        )
    scale = size / max(w, h)
    sw, sh = max(1, round(w * scale)), max(1, round(h * scale))
    blank[:sh, :sw] = np.asarray(rgb.resize((sw, sh), Image.Resampling.BILINEAR))
    return blank, (w, h), (sw, sh), ""


def decode_batch(
    batch: dict[str, Any], size: int, letterbox: bool, min_side: int
) -> dict[str, np.ndarray]:
    """Ray Data batch {"index", "uri"} -> + "pixels" (B, S, S, 3), "size" (B, 2), "scaled"
    (B, 2), "error" (B,) strings."""
    pixels: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    scaled: list[tuple[int, int]] = []
    errors: list[str] = []
    for uri in batch["uri"]:
        try:
            data = fs.read_bytes(str(uri))
        except fs.StorageError as e:
            out = (np.zeros((size, size, 3), np.uint8), (0, 0), (0, 0), f"cannot be read ({e})")
        else:
            out = decode(data, size, letterbox, min_side)
        pixels.append(out[0])
        sizes.append(out[1])
        scaled.append(out[2])
        errors.append(out[3])
    return {
        "index": np.asarray(batch["index"], np.int64),
        "uri": np.asarray([str(u) for u in batch["uri"]], dtype=object),
        "pixels": np.stack(pixels),
        "size": np.asarray(sizes, np.int32).reshape(-1, 2),
        "scaled": np.asarray(scaled, np.int32).reshape(-1, 2),
        "error": np.asarray(errors, dtype=object),
    }
