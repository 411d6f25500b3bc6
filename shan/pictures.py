"""Attention pictures: which regions of an image each word of a sentence attends to (the L2L
weights, docs/model.md §3), drawn over the image or its boxes. The evaluation draws them for its
best-ranked images, the search for a sentence's best match.

torch and matplotlib are imported only when a picture is drawn.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np

from shan.data import fs

TITLE_CHARS = 160  # an attention picture's title (its caption) at most

if TYPE_CHECKING:
    from shan.data.reader import SplitArrays
    from shan.model import SHAN
    from shan.vocab import Vocabulary


def word_region_attention(
    model: SHAN, features: np.ndarray, count: int, tokens: list[int]
) -> np.ndarray:
    """(regions, words) L2L weights of one pair (docs/model.md §3: each column sums to 1):
    which regions each word attends to; :meth:`SHAN.l2l_attention`'s beta."""
    import torch

    model.eval()
    f = torch.from_numpy(np.array(features[:count], dtype=np.float32))[None]  # (1, k, F)
    t = torch.tensor(tokens)[None]  # (1, n)
    with torch.no_grad():
        im = model.encode_images(f)
        cap = model.encode_captions(t, torch.tensor([len(tokens)]))
        beta = model.l2l_attention(im, cap)[1]  # (1, k, n)
    return beta[0].float().numpy()


def load_image(uri: str) -> np.ndarray | None:
    """The picture at ``uri`` (local or ``s3://``, through ``shan.data.fs``) as (H, W, 3) uint8;
    None when it cannot be read or decoded (the attention is then drawn on the boxes alone)."""
    try:
        from PIL import Image

        with Image.open(io.BytesIO(fs.read_bytes(uri))) as im:
            return np.asarray(im.convert("RGB"))
    except Exception:
        return None


def plot_attention(
    words: list[str],
    beta: np.ndarray,
    boxes: np.ndarray | None,
    title: str,
    image: np.ndarray | None = None,
) -> bytes:
    """Which regions each word attends to: beta (regions, words); boxes (regions, 4) in the
    image's pixels; ``image`` (H, W, 3), when given, drawn under the boxes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    keep = [j for j, w in enumerate(words) if w not in ("<start>", "<end>")][:8]
    if boxes is None:
        fig, ax = plt.subplots(figsize=(1 + 0.6 * len(keep), 5))
        ax.imshow(beta[:, keep], aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(keep)), [words[j] for j in keep], rotation=45)
        ax.set_ylabel("region")
    else:
        fig, axes = plt.subplots(1, len(keep), figsize=(2.6 * len(keep), 2.8), squeeze=False)
        w, h = float(boxes[:, 2].max()), float(boxes[:, 3].max())
        if image is not None:
            h, w = float(image.shape[0]), float(image.shape[1])
        for ax, j in zip(axes[0], keep):
            if image is not None:
                ax.imshow(image, extent=(0, w, h, 0))
            weights = beta[:, j] / max(beta[:, j].max(), 1e-9)
            for (x1, y1, x2, y2), a in zip(boxes, weights):
                ax.add_patch(
                    Rectangle(
                        (x1, y1),
                        x2 - x1,
                        y2 - y1,
                        fill=True,
                        alpha=(0.55 if image is not None else 0.7) * a,
                        color="tab:red",
                        linewidth=0,
                    )
                )
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, alpha=0.15))
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(words[j])
    if len(title) > TITLE_CHARS:  # a caption of any length: the picture's title stays a line
        title = title[: TITLE_CHARS - 3] + "..."
    fig.suptitle(title, fontsize=9, y=1.06)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def attention_picture(
    model: SHAN, vocab: Vocabulary, data: SplitArrays, row: int, tokens: list[int], *, title: str
) -> bytes:
    """A PNG of which regions of image ``row`` of ``data`` each word of ``tokens`` attends to:
    over the recorded image when the data set has its path and boxes, else over the boxes
    alone, else a (regions, words) heat map."""
    count = int(data.num_regions[row])
    beta = word_region_attention(model, data.features[row], count, tokens)
    boxes = None if data.boxes is None else data.boxes[row][:count]
    uris = getattr(data, "image_uris", None)
    image = load_image(uris[row]) if uris is not None and boxes is not None else None
    return plot_attention(vocab.decode(tokens), beta, boxes, title, image)


def attention_pictures(
    model: SHAN,
    vocab: Vocabulary,
    data: SplitArrays,
    *,
    rows: np.ndarray,
    sims: np.ndarray,
    cap_rows: np.ndarray,
    n: int = 3,
) -> dict[str, bytes]:
    """For the first ``n`` images ranked right (their best caption is a ground truth), which
    regions each word of that caption attends to: ``{"attention_0.png": PNG, ...}``. ``rows``
    (M,): the images' rows in ``data``; ``sims`` (M, C) their scores against the captions;
    ``cap_rows`` (C,): each caption's image (an index into ``rows``)."""
    out: dict[str, bytes] = {}
    for i in range(min(len(rows), 50)):
        gts = np.flatnonzero(cap_rows == i)
        best = int(gts[np.argmax(sims[i, gts])])
        if sims[i].argmax() not in gts:
            continue
        row = int(rows[i])
        title = f"image {int(data.image_ids[row])}: {data.captions[best]}"
        out[f"attention_{len(out)}.png"] = attention_picture(
            model, vocab, data, row, data.tokens[best], title=title
        )
        if len(out) == n:
            break
    return out


def marked_png(png: bytes, mark: bytes) -> bytes:
    """``png`` with a tEXt chunk ``Software: <mark>`` after its header chunk (so a program can
    later tell the pictures it wrote from a user's)."""
    body = b"Software\0" + mark
    chunk = struct.pack(">I", len(body)) + b"tEXt" + body
    chunk += struct.pack(">I", zlib.crc32(b"tEXt" + body) & 0xFFFFFFFF)
    ihdr_end = 8 + 8 + struct.unpack(">I", png[8:12])[0] + 4  # signature, IHDR, its CRC
    return png[:ihdr_end] + chunk + png[ihdr_end:]


__all__ = [
    "attention_picture",
    "attention_pictures",
    "load_image",
    "marked_png",
    "plot_attention",
    "word_region_attention",
]
