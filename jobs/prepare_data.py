"""Make data sets in the project's format: convert SCAN precomp, generate, validate.

    python jobs/prepare_data.py precomp SRC --out DEST [--splits train dev test] [--vocab V]
    python jobs/prepare_data.py synthetic --out DEST [--train 4000 --dev 500 --test 1000]
    python jobs/prepare_data.py validate PATH

DEST and PATH are local folders or s3:// URLs (AWS_ENDPOINT_URL and the AWS variables apply).
DEST must be new, an empty folder, or (with --overwrite) a data set: a location holding other
files is refused, and the old data set stays valid until the new one is complete.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shan.argtypes import at_least  # noqa: E402
from shan.data.precomp import convert_precomp  # noqa: E402
from shan.data.synthetic import generate_synthetic  # noqa: E402
from shan.data.validate import format_summary, validate  # noqa: E402
from shan.errors import run_job  # noqa: E402

OVERWRITE = "replace the data set at --out (only a data set: its card present)"


def kill_after(chunks: int | None):
    """Test hook: SIGKILL this process once ``chunks`` chunks are written."""
    if chunks is None:
        return None
    import os
    import signal

    return lambda n: os.kill(os.getpid(), signal.SIGKILL) if n >= chunks else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("precomp", help="convert a SCAN precomp folder")
    c.add_argument("src", help="folder with {split}_ims.npy and {split}_caps.txt")
    c.add_argument("--out", required=True, help="destination folder or s3:// URL")
    c.add_argument("--splits", nargs="+", help="splits to convert (default: all found)")
    c.add_argument("--vocab", help="SCAN vocab json (default: the folder's, else built)")
    c.add_argument("--name", help="data set name (default: the folder's name)")
    c.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    c.add_argument("--chunk-rows", type=at_least(1), default=256, help="images per chunk in memory")
    c.add_argument("--rows-per-file", type=at_least(1), default=2000, help="images per shard")
    c.add_argument("--min-count", type=at_least(1), default=4, help="word count for a built vocab")
    c.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    c.add_argument("--kill-after-chunks", type=int, help=argparse.SUPPRESS)  # tests: SIGKILL
    g = sub.add_parser("synthetic", help="generate a synthetic data set")
    g.add_argument("--out", required=True, help="destination folder or s3:// URL")
    g.add_argument("--train", type=at_least(0), default=4000, help="train images")
    g.add_argument("--dev", type=at_least(0), default=500, help="dev images")
    g.add_argument("--test", type=at_least(0), default=1000, help="test images")
    g.add_argument("--regions", type=at_least(1), default=16, help="regions per image")
    g.add_argument("--feature-dim", type=at_least(1), default=64, help="region feature size")
    g.add_argument("--concepts", type=at_least(5), default=120, help="made-up nouns (5..2000)")
    g.add_argument("--captions-per-image", type=at_least(1), default=5, help="captions per image")
    g.add_argument("--seed", type=at_least(0), default=0, help="random seed")
    g.add_argument("--overwrite", action="store_true", help=OVERWRITE)
    v = sub.add_parser("validate", help="check a data set and print a summary")
    v.add_argument("path", help="data set folder or s3:// URL")
    v.add_argument("--json", action="store_true", help="print the summary as json")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "precomp":
        convert_precomp(
            args.src,
            args.out,
            splits=args.splits,
            vocab_path=args.vocab,
            name=args.name,
            dtype=args.dtype,
            chunk_rows=args.chunk_rows,
            rows_per_file=args.rows_per_file,
            min_count=args.min_count,
            overwrite=args.overwrite,
            on_chunk=kill_after(args.kill_after_chunks),
        )
        print(f"wrote {args.out}")
    elif args.command == "synthetic":
        sizes = {"train": args.train, "dev": args.dev, "test": args.test}
        generate_synthetic(
            args.out,
            images={k: n for k, n in sizes.items() if n > 0},
            regions=args.regions,
            feature_dim=args.feature_dim,
            concepts=args.concepts,
            captions_per_image=args.captions_per_image,
            seed=args.seed,
            overwrite=args.overwrite,
        )
        print(f"wrote {args.out}")
    else:
        summary = validate(args.path)
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
        print(f"{args.path}: valid")
    return 0


if __name__ == "__main__":
    run_job(main)
