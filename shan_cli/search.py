"""Search a data set split for the images that match sentences, with a trained model.

    shan search --model REF --data PATH [--split test] "a dog on the grass" ["..." ...]
    shan search --model REF --data PATH --queries FILE [-k 10] [--json] [--picture best.png]
    shan search --model REF --index DEST [--rerank 100] [-k 5] "a dog on the grass"

REF: a checkpoint folder, an s3:// URL, an MLflow run id, or models:/NAME@ALIAS | models:/NAME/N.
The split's images are encoded once per model and data set and cached in --cache (a file
named after the model's checkpoint digest, the data's fingerprint and the split); later
searches load them and only encode and score the sentences. Results go to stdout: a table per
sentence, or with --json a list with, per sentence, its matches {rank, image, row, total, l2l,
g2l, g2g}; progress lines go to stderr. A search takes at most 1,000 sentences, each of at
most 2,000 characters and 200 words, with at least one word (not only punctuation).

With --index DEST (an index of the model, `shan index build`), each sentence's --rerank K
(default 100, at least -k) nearest images by the model's first stage are scored with the
model's scorer and the best -k printed: the data set is not read (--data is optional; when
given, the index must have been built from it, and --picture needs it). Without --index every
image of the split is scored (the exact reference).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TextIO

from shan.errors import JobError
from shan_cli.argtypes import at_least


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter, allow_abbrev=False
    )
    p.add_argument("sentences", nargs="*", metavar="SENTENCE", help="sentences to search for")
    p.add_argument("--model", required=True, help="model reference (see above)")
    p.add_argument("--data", help="data set root, local or s3:// (required without --index)")
    p.add_argument(
        "--split", help="the split searched (default test; with --index the index's split)"
    )
    p.add_argument(
        "--index", metavar="DEST", help="an index of the model's images (shan index build)"
    )
    p.add_argument(
        "--rerank",
        type=int,
        metavar="K",
        help="with --index: rerank each sentence's K nearest images (default 100, >= -k)",
    )
    p.add_argument("--queries", metavar="FILE", help="more sentences, one per line (UTF-8)")
    p.add_argument(
        "-k", "--top", type=at_least(1), default=5, metavar="K", help="matches per sentence (5)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument(
        "--picture",
        metavar="PATH.png",
        help="draw which regions each word attends to in the first sentence's best match",
    )
    p.add_argument(
        "--cache",
        default="searches",
        metavar="DIR",
        help="local folder of the cached image indexes (default searches/)",
    )
    return p


def read_queries(path: str) -> list[str]:
    """The non-blank lines of ``path``, read bounded: a line longer than the longest query or
    more queries than a search takes is a JobError naming the file and line, before the rest
    is read (``/dev/zero`` too)."""
    from shan.search.query import MAX_QUERIES, MAX_QUERY_CHARS

    try:
        with open(path, encoding="utf-8") as f:
            queries = _bounded_lines(f, path, MAX_QUERY_CHARS, MAX_QUERIES)
    except FileNotFoundError:
        raise JobError(f"--queries {path} does not exist") from None
    except IsADirectoryError:
        raise JobError(f"--queries {path} is a folder") from None
    except UnicodeDecodeError as e:
        raise JobError(f"--queries {path} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise JobError(f"--queries {path}: cannot read it ({e.strerror})") from None
    if not queries:
        raise JobError(f"--queries {path} holds no sentence")
    return queries


def _bounded_lines(f: TextIO, path: str, width: int, most: int) -> list[str]:
    """The stripped non-blank lines of ``f``, each read ``width`` + 1 characters at most; at
    most ``most`` of them, and ``most`` * 10 lines in all (blank ones included)."""
    queries: list[str] = []
    for n in range(1, most * 10 + 2):
        line = f.readline(width + 2)  # the text, its newline, one more: too long
        if not line:
            return queries
        if len(line.rstrip("\r\n")) > width:
            raise JobError(f"--queries {path}: line {n} is longer than {width:,} characters")
        if line.strip():
            queries.append(line.strip())
        if len(queries) > most:
            raise JobError(f"--queries {path} holds more than {most:,} sentences")
    raise JobError(f"--queries {path} has more than {most * 10:,} lines")


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.sentences and not args.queries:
        p.error("give a sentence or --queries FILE")
    if args.data is None and args.index is None:
        p.error("give --data PATH (the data set searched) or --index DEST")
    sentences = list(args.sentences) + (read_queries(args.queries) if args.queries else [])

    from shan.search.job import SearchOptions, search
    from shan.search.query import format_matches

    opts = SearchOptions(
        split=args.split if args.split or args.index else "test",
        top=args.top,
        cache=args.cache,
        picture=args.picture,
        index=args.index,
        rerank=args.rerank,
    )
    result = search(args.model, args.data, sentences, opts, log=lambda s: print(s, file=sys.stderr))
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print("\n\n".join(format_matches(q, m) for q, m in zip(result.queries, result.matches)))
    return 0
