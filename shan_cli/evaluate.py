"""Evaluate trained SHAN models: the whole similarity matrix on Ray actors, logged to MLflow.

    shan evaluate --model REF --data PATH [--split test] [--protocol plain] --out DIR
    shan evaluate --model REF --ensemble REF2 REF3 ... --data PATH --out DIR
    shan evaluate --model models:/NAME@candidate --promote champion --data PATH
    shan evaluate --model REF --data PATH --out DIR --rerank 100 [--compare EXHAUSTIVE_DIR]

REF: a checkpoint folder, an s3:// URL, an MLflow run id, or models:/NAME@ALIAS | models:/NAME/N.
Protocols: plain (the whole split), f30k (1K test), coco-1k (mean of 5 folds of 1K), coco-5k.
DIR (local or s3://) receives the matrices, index.json, metrics.json (written last, and only
when every tile is scored and finite), recall.md and plots; finished tiles are kept there, so a
rerun with the same DIR skips them (tiles of other data, model, precision or device kind are
recomputed). DIR must hold nothing but an evaluation's own files, and one evaluation at a time
writes there (a lock: DIR/eval.lock).
On a cluster (RAY_ADDRESS set, or a submitted job) the actors are asked for as given
(--actors, --gpus-per-actor, --cpus-per-actor) and the job waits for the autoscaler
(--wait-timeout); a local instance is sized from the machine.
--rerank K (a model with a first-stage head): each caption is scored against its top K images
and each image against its top K captions by the first stage's inner product, not against the
whole split; candidates and their scores go sparse to DIR/rerank/ (its own metrics.json,
recall.md and resumable tiles). Recall counts a ground truth outside the K as a miss. When DIR
(or --compare DIR2) holds the same model's exhaustive evaluation, the difference per metric is
reported too.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from shan.eval import PROTOCOLS
from shan_cli.argtypes import at_least


def gpu_share(text: str) -> float:
    """GPUs per actor: 0 (none), a fraction of one, or a whole number (as Ray requires)."""
    value = float(at_least(0.0, float)(text))
    if value > 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(f"must be at most 1 or a whole number, got {text}")
    if 0 < value < 0.01:
        raise argparse.ArgumentTypeError(f"must be 0 or at least 0.01, got {text}")
    return value


gpu_share.__name__ = "GPU share"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--model", required=True, help="model reference (see above)")
    p.add_argument(
        "--ensemble",
        nargs="+",
        default=[],
        metavar="REF",
        help="more models whose matrices are averaged with --model's",
    )
    p.add_argument("--data", required=True, help="data set root, local or s3://")
    p.add_argument("--split", default="test", help="the data set's split to score (default test)")
    p.add_argument(
        "--protocol", default="plain", choices=PROTOCOLS, help="see above (default plain)"
    )
    p.add_argument("--out", help="output folder or s3:// URL (default: evaluations/<model>)")
    p.add_argument(
        "--promote",
        metavar="ALIAS",
        help="compare with the version holding ALIAS; move ALIAS if better",
    )
    p.add_argument(
        "--tile-images", type=at_least(1), default=256, metavar="N", help="images a tile (256)"
    )
    p.add_argument(
        "--tile-captions",
        type=at_least(1),
        default=1024,
        metavar="N",
        help="captions a tile (1024)",
    )
    p.add_argument(
        "--actors",
        type=at_least(1),
        metavar="N",
        help="scoring actors (default: 1 on a cluster; sized to a local instance)",
    )
    p.add_argument(
        "--cpus-per-actor",
        type=at_least(0.01, float),
        metavar="CPUS",
        help="CPUs per actor (default: 1 on a cluster; a share of a local instance)",
    )
    p.add_argument(
        "--gpus-per-actor",
        type=gpu_share,
        metavar="GPUS",
        help="GPUs per actor; 0: none (default: none on a cluster, every GPU locally)",
    )
    p.add_argument(
        "--wait-timeout",
        type=at_least(1.0, float),
        default=1800.0,
        metavar="SECONDS",
        help="how long to wait for the actors: on a cluster for room, locally to start\n"
        "(default 1800)",
    )
    p.add_argument(
        "--rerank",
        type=int,
        metavar="K",
        help="score each query against its top K first-stage candidates only (K >= 10)",
    )
    p.add_argument(
        "--compare",
        metavar="DIR",
        help="with --rerank: an exhaustive evaluation's --out to report the difference from\n"
        "(default: --out itself, when it holds one)",
    )
    p.add_argument("--no-bf16", action="store_true", help="float32 on GPU too")
    p.add_argument("--no-mlflow", action="store_true", help="do not log a run to MLflow")
    return p


def default_out(ref: str, split: str, protocol: str) -> str:
    return str(Path("evaluations") / re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{ref}-{split}-{protocol}"))


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.promote is not None:
        if args.no_mlflow:
            p.error("--promote records its decision in MLflow: it cannot run with --no-mlflow")
        if not args.model.startswith("models:/"):
            p.error(f"--promote needs --model models:/NAME@ALIAS, got {args.model!r}")
        if args.ensemble:
            p.error("--promote evaluates one model: it cannot run with --ensemble")
        if args.rerank is not None:
            p.error("--promote compares exhaustive evaluations: it cannot run with --rerank")

    from shan.data import fs
    from shan.eval import outputs
    from shan.eval.job import EvalOptions, evaluate
    from shan.eval.record import log_evaluation
    from shan.promotion import promote
    from shan.tracking.runs import check_reachable, tracking_uri

    opts = EvalOptions(
        split=args.split,
        protocol=args.protocol,
        tile_images=args.tile_images,
        tile_captions=args.tile_captions,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        bf16=not args.no_bf16,
        wait_timeout_s=args.wait_timeout,
        rerank=args.rerank,
        compare=args.compare,
    )
    opts.check()  # before the work: one error line
    out = args.out or default_out(args.model, args.split, args.protocol)
    outputs.check_out(out)
    if not args.no_mlflow:
        check_reachable(tracking_uri())  # before the work, not after it

    def run(ref: str, where: str) -> tuple[float, str | None]:
        result = evaluate([ref, *args.ensemble], args.data, where, opts)
        run_id = None if args.no_mlflow else log_evaluation(result, where, opts)
        print(f"outputs in {where}" + (f"; MLflow run {run_id}" if run_id else ""))
        return result.rsum, run_id

    if args.promote:

        def versioned(ref: str) -> tuple[float, str | None]:
            return run(ref, fs.join(out, f"v{ref.rsplit('/', 1)[1]}"))

        promote(args.model, args.promote, versioned, (args.split, args.protocol))
    else:
        run(args.model, out)
    return 0
