"""What an evaluation writes: matrices, index, metrics, a recall table, a recall-at-K plot and
attention pictures. ``metrics.json`` is written last, so its presence means complete.

An evaluation writes only into an output location that holds nothing but its own kind of files
(:func:`check_out`): it overwrites and deletes there, so a folder of anything else is refused.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs

from shan.data import fs
from shan.errors import JobError
from shan.metrics import SCORES, i2t_ranks, t2i_ranks
from shan.vocab import Vocabulary

if TYPE_CHECKING:  # torch only where a picture is drawn: the jobs' error paths stay light
    from shan.data.reader import SplitArrays
    from shan.model import SHAN

# What an evaluation's --out may hold (posix paths relative to it). v<N>/ are --promote's
# per-version evaluations; tiles/model-<i>/ the finished tiles of model i.
_FILE = (
    r"sims_(total|l2l|g2l|g2g)\.npy|index\.json|metrics\.json|recall\.md|recall_at_k\.png"
    r"|attention_\d+\.png|promotion\.json|eval\.lock"
    r"|tiles/model-\d+/(plan\.json|tile-r\d{5}-c\d{5}\.npz)(\.tmp-\d+)?"
)
OURS_FILE = re.compile(rf"^(v\d+/)?({_FILE})$")
# one score's (i2t R@1..K, t2i R@1..K) in percent
Curve = tuple[list[float], list[float]]
TITLE_CHARS = 160  # an attention picture's title (its caption) at most
OURS_DIR = re.compile(r"^(v\d+|(v\d+/)?tiles|(v\d+/)?tiles/model-\d+)$")


def foreign_entries(out: str) -> list[str]:
    """What ``out`` holds that an evaluation does not write (relative paths, sorted); a
    StorageError when it cannot be listed, a JobError when it is a file."""
    filesystem, root = fs.filesystem(out)
    try:
        info = filesystem.get_file_info(root)
        if info.type == pafs.FileType.NotFound:
            return []
        if info.type != pafs.FileType.Directory:
            raise JobError(f"--out {out} is a file, not a folder")
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    except OSError as e:
        raise fs.StorageError(f"cannot list {out}: {e}") from e
    bad: list[str] = []
    for i in infos:
        rel = i.path[len(root) :].lstrip("/")
        ok = OURS_DIR if i.type == pafs.FileType.Directory else OURS_FILE
        if not ok.match(rel):
            bad.append(rel + ("/" if i.type == pafs.FileType.Directory else ""))
    # a foreign folder's contents need no separate mention
    return sorted(b for b in bad if not any(b != d and b.startswith(d) for d in bad))


def check_out(out: str) -> None:
    """JobError naming what ``out`` holds that is not an evaluation's output."""
    bad = foreign_entries(out)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise JobError(
            f"--out {out} holds files that are not an evaluation's: {', '.join(bad[:3])}{more}; "
            "use an empty or new folder (an evaluation overwrites and deletes its own files there)"
        )


def mark_incomplete(out: str) -> None:
    """Remove ``metrics.json``: from now on until the new one is written, ``out`` is incomplete.
    The attention pictures of an earlier run go too: this run may draw fewer of them."""
    fs.delete_tree(fs.join(out, "metrics.json"))
    for name in fs.list_files(out):
        if re.fullmatch(r"attention_\d+\.png", name):
            fs.delete_file(fs.join(out, name))


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a.astype(np.float32, copy=False))
    return buf.getvalue()


def recall_curves(
    sims: dict[str, np.ndarray], caption_image: np.ndarray, kmax: int = 50
) -> dict[str, Curve]:
    """{score: (i2t R@1..kmax, t2i R@1..kmax)} in percent."""
    ks = np.arange(1, kmax + 1)
    out: dict[str, Curve] = {}
    for name, m in sims.items():
        ri, rt = i2t_ranks(m, caption_image), t2i_ranks(m, caption_image)
        out[name] = ([100 * (ri < k).mean() for k in ks], [100 * (rt < k).mean() for k in ks])
    return out


def plot_recall(curves: dict[str, Curve], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    ks = np.arange(1, len(next(iter(curves.values()))[0]) + 1)
    for ax, d, label in ((axes[0], 0, "image to text"), (axes[1], 1, "text to image")):
        for name, c in curves.items():
            ax.plot(ks, c[d], label=name, linewidth=2.2 if name == "total" else 1.2)
        ax.set_xlabel("K")
        ax.set_title(f"{label}: R@K")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recall (%)")
    axes[1].legend()
    fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


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
    regions each word of that caption attends to."""
    out: dict[str, bytes] = {}
    for i in range(min(len(rows), 50)):
        gts = np.flatnonzero(cap_rows == i)
        best = int(gts[np.argmax(sims[i, gts])])
        if sims[i].argmax() not in gts:
            continue
        row = rows[i]
        toks = data.tokens[best]
        beta = word_region_attention(model, data.features[row], int(data.num_regions[row]), toks)
        boxes = None if data.boxes is None else data.boxes[row][: int(data.num_regions[row])]
        title = f"image {int(data.image_ids[row])}: {data.captions[best]}"
        uris = getattr(data, "image_uris", None)
        image = load_image(uris[row]) if uris is not None and boxes is not None else None
        out[f"attention_{len(out)}.png"] = plot_attention(
            vocab.decode(toks), beta, boxes, title, image
        )
        if len(out) == n:
            break
    return out


def write_outputs(
    out: str,
    sims: dict[str, np.ndarray],
    index: dict[str, Any],
    metrics: dict[str, Any],
    *,
    extra: dict[str, bytes],
    recall_md: str,
) -> list[str]:
    """Write every output, ``metrics.json`` last; returns the file names."""
    names: list[str] = []
    for k in SCORES:
        if not np.isfinite(sims[k]).all():
            raise JobError(f"the {k} matrix holds NaN or infinite scores; nothing was written")
    existing = fs.join(out, "metrics.json")
    mark_incomplete(out)  # a rerun is incomplete until it is done
    for k in SCORES:
        fs.write_bytes(fs.join(out, f"sims_{k}.npy"), npy_bytes(sims[k]))
        names.append(f"sims_{k}.npy")
    files = {
        "index.json": json.dumps(index).encode(),
        "recall.md": recall_md.encode(),
        **extra,
    }
    for name, data in files.items():
        fs.write_bytes(fs.join(out, name), data)
        names.append(name)
    fs.write_bytes(existing, json.dumps(metrics, indent=2).encode())
    return [*names, "metrics.json"]


def local_copy(out: str, names: list[str], max_bytes: int) -> tuple[str, list[str]]:
    """Files of ``out`` under ``max_bytes`` each, in a local folder (to log to MLflow); larger
    ones are not read at all."""
    kept = [name for name in names if fs.size(fs.join(out, name)) <= max_bytes]
    d = tempfile.mkdtemp(prefix="shan-eval-")
    try:
        for name in kept:
            Path(d, name).write_bytes(fs.read_bytes(fs.join(out, name)))
    except BaseException:  # a file that went missing: nothing of ours stays behind
        shutil.rmtree(d, ignore_errors=True)
        raise
    return d, kept
