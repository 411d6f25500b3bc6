"""What an evaluation writes: matrices, index, metrics, a recall table, a recall-at-K plot and
attention pictures (drawn by :mod:`shan.pictures`). ``metrics.json`` is written last, so its
presence means complete.

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
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from shan.data import fs
from shan.errors import JobError
from shan.metrics import SCORES, i2t_ranks, t2i_ranks

# What an evaluation's --out may hold (posix paths relative to it). v<N>/ are --promote's
# per-version evaluations; tiles/model-<i>/ the finished tiles of model i; rerank/ a --rerank
# evaluation's.
_FILE = (
    r"sims_(total|l2l|g2l|g2g)\.npy|index\.json|metrics\.json|recall\.md|recall_at_k\.png"
    r"|attention_\d+\.png|promotion\.json|eval\.lock"
    r"|tiles/model-\d+/(plan\.json|tile-r\d{5}-c\d{5}\.npz)"
    r"|tiles/model-\d+/\.?(plan\.json|tile-r\d{5}-c\d{5}\.npz)\.tmp-\w+"  # killed writes
    # rerank/: a --rerank evaluation's sparse outputs and tiles (shan.eval.rerank)
    r"|rerank/((t2i|i2t)_(candidates|total|l2l|g2l|g2g)\.npy|index\.json|metrics\.json|recall\.md)"
    r"|rerank/tiles/model-\d+/(plan\.json|tile-r\d{5}-c\d{5}\.npz)"
    r"|rerank/tiles/model-\d+/\.?(plan\.json|tile-r\d{5}-c\d{5}\.npz)\.tmp-\w+"
)
OURS_FILE = re.compile(rf"^(v\d+/)?({_FILE})$")
# one score's (i2t R@1..K, t2i R@1..K) in percent
Curve = tuple[list[float], list[float]]
OURS_DIR = re.compile(r"^(v\d+|(v\d+/)?(rerank/)?tiles(/model-\d+)?|(v\d+/)?rerank)$")


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
