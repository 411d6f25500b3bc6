"""Serve a trained model over HTTP: MLflow's scoring server, behind a request guard.

    shan serve --model REF [--host 127.0.0.1] [--port 5001] [--index DEST]

REF: a checkpoint folder, an s3:// URL, an MLflow run (its id, runs:/ID/model), a logged model
(models:/m-...) or a registered model (models:/NAME@ALIAS, models:/NAME/N). The answers are those
of `mlflow models serve` of the model training logged (POST /invocations, GET /ping): the four
score matrices of {"inputs": {"features", "counts", "captions"}}, or with --index (an index of
this model, shan index build) a search. In front of MLflow's parser a request over
--max-body-bytes gets HTTP 413 and JSON nested deeper than --max-json-depth gets HTTP 400, each
naming the limit (MLflow alone answers deep JSON with a bare 500). SHAN_SERVE_MAX_SCORES and
SHAN_SERVE_MAX_FEATURES bound what a request may ask for, as with mlflow models serve.
"""

from __future__ import annotations

import argparse
import sys

from shan_cli.argtypes import at_least


def parser() -> argparse.ArgumentParser:
    from shan.server import MAX_BYTES, MAX_DEPTH

    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    p.add_argument("--model", required=True, help="model reference (see above)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    p.add_argument("--port", type=int, default=5001, help="port to listen on (5001)")
    p.add_argument(
        "--index", metavar="DEST", help="an index of the model (shan index build): it searches"
    )
    p.add_argument(
        "--max-json-depth",
        type=at_least(4),
        default=MAX_DEPTH,
        metavar="N",
        help=f"deepest JSON nesting a request may have ({MAX_DEPTH})",
    )
    p.add_argument(
        "--max-body-bytes",
        type=at_least(1024),
        default=MAX_BYTES,
        metavar="N",
        help=f"largest request body ({MAX_BYTES:,} bytes)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from shan.server import ServeOptions, serve

    args = parser().parse_args(argv)
    opts = ServeOptions(args.host, args.port, args.index, args.max_json_depth, args.max_body_bytes)
    serve(args.model, opts, log=lambda s: print(s, file=sys.stderr, flush=True))
    return 0
