"""Build the image index of a data set split for a trained model: retrieve with its first
stage, rerank with SHAN (``shan search --index``, ``shan evaluate --rerank``).

    shan index build --model REF --data ROOT --split test --out DEST [--kind auto]
    shan index head --model REF --data ROOT --out CHECKPOINT [--epochs 5]

REF: a checkpoint folder, an s3:// URL, an MLflow run id, or models:/NAME@ALIAS | models:/NAME/N;
the model needs a first-stage head (model.first_stage_dim above 0). The split's images are
encoded on Ray Data actors (one per GPU with --gpus-per-actor; on CPUs, fractional-CPU actors
sized to a local instance), each image's first-stage vector goes into a FAISS index (--kind
auto: exact up to 200,000 images, IVF past it) and its region embeddings into memory-mapped
shards, so that a rerank reads only its candidates.

DEST is a local folder or an s3:// prefix: new, an empty folder, or an index. One holding other
files is refused; an index of the same model, data and split is left as it is (nothing to do);
another index is replaced only with --overwrite, and stays valid until the new one is complete.
"""

from __future__ import annotations

import argparse
import sys

from shan.config import FIRST_STAGE_POOLS
from shan.index import SHARD_SIZE
from shan.index.ann import KINDS
from shan_cli.argtypes import at_least, positive
from shan_cli.evaluate import gpu_share


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    sub = p.add_subparsers(dest="command", required=True, help="what to do (COMMAND --help)")
    b = sub.add_parser(
        "build",
        help="build an index",
        description=__doc__,
        allow_abbrev=False,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    b.add_argument("--model", required=True, help="model reference (see above)")
    b.add_argument("--data", required=True, help="data set root, local or s3://")
    b.add_argument("--split", default="test", help="the split indexed (default test)")
    b.add_argument("--out", required=True, metavar="DEST", help="index folder or s3:// prefix")
    b.add_argument(
        "--kind",
        choices=KINDS,
        default="auto",
        help="FAISS index: auto (flat up to 200,000 images, else ivf), flat, ivf, hnsw",
    )
    b.add_argument(
        "--actors",
        type=at_least(1),
        metavar="N",
        help="encoding actors (default: 1 on a cluster; sized to a local instance)",
    )
    b.add_argument(
        "--cpus-per-actor",
        type=positive(float),
        metavar="CPUS",
        help="CPUs per actor (default: 1 on a cluster; a share of a local instance)",
    )
    b.add_argument(
        "--gpus-per-actor",
        type=gpu_share,
        metavar="GPUS",
        help="GPUs per actor; 0: none (default: none on a cluster, every GPU locally)",
    )
    b.add_argument(
        "--batch-size",
        type=at_least(1),
        default=256,
        metavar="N",
        help="images an actor encodes at a time (256)",
    )
    b.add_argument(
        "--shard-size",
        type=at_least(1),
        default=SHARD_SIZE,
        metavar="N",
        help=f"images a fragments file holds at most ({SHARD_SIZE})",
    )
    b.add_argument("--local", action="store_true", help="no Ray: encode in this process")
    b.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the index at DEST (only an index: its index.json present)",
    )
    h = sub.add_parser(
        "head",
        help="fit a first stage to a trained model (a new checkpoint folder)",
        description=HEAD_HELP,
        allow_abbrev=False,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    h.add_argument("--model", required=True, help="model reference (as for build)")
    h.add_argument("--data", required=True, help="data set root, local or s3://")
    h.add_argument("--split", default="train", help="the split fitted on (default train)")
    h.add_argument("--out", required=True, metavar="CHECKPOINT", help="new checkpoint folder")
    h.add_argument("--dim", type=at_least(1), metavar="D",
                   help="the head's size (default: the model's, else 256)")  # fmt: skip
    h.add_argument("--epochs", type=at_least(1), default=5, metavar="N",
                   help="passes over the split's captions (5)")  # fmt: skip
    h.add_argument("--batch", type=at_least(2), default=128, metavar="B",
                   help="pairs a step, each the others' negatives (128)")  # fmt: skip
    h.add_argument("--lr", type=positive(float), default=1e-3, help="Adam's rate (0.001)")
    h.add_argument("--pool", choices=FIRST_STAGE_POOLS, default="max",
                   help="max: each fragment projected, then the element-wise max (default);\n"
                        "attention: attention-pooled, then projected (the older head)")  # fmt: skip
    return p


HEAD_HELP = """Fit a first stage to a trained model's frozen encoders and write the model with it
as a new checkpoint folder (SHAN's weights copied unchanged, so its scores stay the same).

For a model trained without a first stage (model.first_stage_dim 0), or to replace the head
trained beside SHAN with one fitted to its final encodings, which finds more of each query's
true match among its candidates (benchmarks/results/first_stage_cpu.txt). Build the index
from the new checkpoint: an index is tied to the model files that built it.
"""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "head":
        return head(args)
    from shan.indexing import IndexOptions, build_index

    opts = IndexOptions(
        kind=args.kind,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        local=args.local,
    )
    result = build_index(
        args.model,
        args.data,
        args.split,
        args.out,
        opts,
        log=lambda s: print(s, file=sys.stderr),
    )
    c = result.card
    state = "built" if result.built else "already there"
    print(f"index {args.out} ({state}): {c.images} images, {c.kind}, D {c.dim}")
    return 0


def head(args: argparse.Namespace) -> int:
    from shan.indexing import HeadOptions, fit_head

    opts = HeadOptions(args.split, args.dim, args.epochs, args.batch, args.lr, args.pool)
    out = fit_head(args.model, args.data, args.out, opts, log=lambda s: print(s, file=sys.stderr))
    print(f"checkpoint with a first stage: {out}")
    return 0
