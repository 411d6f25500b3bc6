"""Build the image index of a data set split for a trained model: retrieve with its first
stage, rerank with SHAN (``shan search --index``, ``shan evaluate --rerank``).

    shan index build --model REF --data ROOT --split test --out DEST [--kind auto]

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
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
