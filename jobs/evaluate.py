"""Evaluate trained SHAN models: the whole similarity matrix on Ray actors, logged to MLflow.

    python jobs/evaluate.py --model REF --data PATH [--split test] [--protocol plain] --out DIR
    python jobs/evaluate.py --model REF --ensemble REF2 REF3 ... --data PATH --out DIR
    python jobs/evaluate.py --model models:/NAME@candidate --promote champion --data PATH

REF: a checkpoint folder, an s3:// URL, an MLflow run id, or models:/NAME@ALIAS | models:/NAME/N.
Protocols: plain (the whole split), f30k (1K test), coco-1k (mean of 5 folds of 1K), coco-5k.
DIR (local or s3://) receives the matrices, index.json, metrics.json (written last), recall.md
and plots; finished tiles are kept there, so a rerun with the same DIR skips them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shan.errors import run_job  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="model reference (see above)")
    p.add_argument(
        "--ensemble",
        nargs="+",
        default=[],
        metavar="REF",
        help="more models whose matrices are averaged with --model's",
    )
    p.add_argument("--data", required=True, help="data set root, local or s3://")
    p.add_argument("--split", default="test")
    p.add_argument("--protocol", default="plain", help="plain, f30k, coco-1k or coco-5k")
    p.add_argument("--out", help="output folder or s3:// URL (default: evaluations/<model>)")
    p.add_argument(
        "--promote",
        metavar="ALIAS",
        help="compare with the version holding ALIAS; move ALIAS if better",
    )
    p.add_argument("--tile-images", type=int, default=256)
    p.add_argument("--tile-captions", type=int, default=1024)
    p.add_argument("--actors", type=int, help="scoring actors (default: sized to the cluster)")
    p.add_argument("--cpus-per-actor", type=float)
    p.add_argument("--gpus-per-actor", type=float)
    p.add_argument("--no-bf16", action="store_true", help="float32 on GPU too")
    p.add_argument("--no-mlflow", action="store_true", help="do not log a run to MLflow")
    p.add_argument("--exit-after-tiles", type=int, help=argparse.SUPPRESS)  # tests: a hard kill
    return p


def default_out(ref: str, split: str, protocol: str) -> str:
    return str(Path("evaluations") / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{ref}-{split}-{protocol}"))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import os

    from shan.eval.job import EvalOptions, check_protocol, evaluate
    from shan.eval.tracking import log_evaluation, promote

    check_protocol(args.protocol)
    opts = EvalOptions(
        split=args.split,
        protocol=args.protocol,
        tile_images=args.tile_images,
        tile_captions=args.tile_captions,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        bf16=not args.no_bf16,
    )
    if args.exit_after_tiles:
        opts.on_tile = lambda n: os._exit(137) if n >= args.exit_after_tiles else None
    out = args.out or default_out(args.model, args.split, args.protocol)

    def run(ref: str, where: str) -> tuple[dict, str | None]:
        result = evaluate([ref, *args.ensemble], args.data, where, opts)
        run_id = None if args.no_mlflow else log_evaluation(result, where, opts)
        print(f"outputs in {where}" + (f"; MLflow run {run_id}" if run_id else ""))
        return result, run_id

    if args.promote:

        def versioned(ref: str) -> tuple[dict, str | None]:
            return run(ref, f"{out.rstrip('/')}/v{ref.rsplit('/', 1)[1]}")

        promote(args.model, args.promote, versioned, args.split, args.protocol)
    else:
        run(args.model, out)
    return 0


if __name__ == "__main__":
    run_job(main)
