"""Decoding images (``shan.features.decode``): the size kept, what is wrong named."""

from __future__ import annotations

import io

from shan.features.decode import decode


def png(size, mode="RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, 100).save(buf, format="PNG")
    return buf.getvalue()


def test_decode_names_what_is_wrong_and_keeps_the_size():
    pixels, size, scaled, err = decode(png((80, 40)), 64, letterbox=False, min_side=16)
    assert (pixels.shape, size, scaled, err) == ((64, 64, 3), (80, 40), (64, 64), "")
    pixels, size, scaled, err = decode(png((80, 40), "L"), 64, letterbox=True, min_side=16)
    assert (size, scaled, err) == ((80, 40), (64, 32), "") and pixels[40:].max() == 0
    assert "empty" in decode(b"", 64, False, 16)[3]
    assert "cannot be decoded" in decode(b"\x89PNG\r\n\x1a\nbroken", 64, False, 16)[3]
    assert "8x40 pixels" in decode(png((8, 40)), 64, False, 16)[3]
