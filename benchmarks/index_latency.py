"""Index build speed and query latency on CPU: retrieve-then-rerank against exhaustive search.

1. Build: ``shan index build``'s job (:func:`shan.indexing.build_index`) on a split of the demo
   data set with a trained demo checkpoint that has a first stage: images/s, encoding and
   writing (in this process, ``local``; with ``--ray`` through Ray Data actors too).
2. Latency at each size N (default 10 k, 100 k, 1 M images): an index of N generated images
   written through the index library (:class:`shan.index.IndexWriter`: real sharded fragment
   files, FAISS of the kind ``shan index build`` picks for N), with random unit region
   embeddings (demo sizes: 16 regions x d) and first-stage vectors drawn around 1,024 random
   centres (so that IVF has clusters to find, as trained vectors do). Each query is a caption
   of the demo test split, one at a time: ``shan.rerank.search_index`` (caption encoded, its
   first-stage vector, FAISS top K, the K candidates' fragments read from the memory-mapped
   shards, ``image_terms`` and the scorer on those K), p50 and p99 over ``--queries``.
   Exhaustive: the scorer over every image (what ``shan search`` without ``--index`` does
   with its cache warm), timed on a slice of at most ``--slice`` images and scaled linearly
   to N where N is larger (said so in the table).

    python benchmarks/index_latency.py --model /work/shared_ckpt/demo-fs \\
        --data /work/shared_ckpt/demo-data      # writes benchmarks/results/index_latency_cpu.txt
    python benchmarks/index_latency.py --model M --data D --sizes 10000 --queries 20 --out -

The generated indexes go under ``--work`` (default: a temporary folder) and are deleted at the
end (1 M images at 16 x 64: about 4.3 GB).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from shan.checkpoint import load_model
from shan.data.reader import read_split
from shan.fingerprint import file_digests
from shan.index import IndexWriter, open_index
from shan.indexing import IndexOptions, build_index
from shan.rerank import search_index
from shan.search.query import score_queries

RESULT = Path(__file__).resolve().parent / "results" / "index_latency_cpu.txt"
CHUNK = 65_536  # images generated and written at a time
CENTRES = 1024  # clusters of the generated first-stage vectors


def percentiles(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):8.1f} ms  p99 {np.percentile(ms, 99):8.1f} ms"


def generate_index(
    dest: Path, n: int, loaded, files: dict, counts_pool: np.ndarray, *, k: int, kind: str = "auto"
) -> float:
    """An index of ``n`` generated images of ``k`` regions at ``dest`` for the model ``loaded``
    (region counts drawn from ``counts_pool``); seconds to write it."""
    cfg = loaded.config.model
    d, dim = cfg.d, cfg.first_stage_dim
    rng = np.random.default_rng(n)
    centres = rng.standard_normal((CENTRES, dim)).astype(np.float32)
    t0 = time.perf_counter()
    with IndexWriter(str(dest), log=lambda s: None) as w:
        for i0 in range(0, n, CHUNK):
            m = min(CHUNK, n - i0)
            v = rng.standard_normal((m, k, d), dtype=np.float32)
            v /= np.linalg.norm(v, axis=-1, keepdims=True)
            vectors = centres[rng.integers(0, CENTRES, m)] + 0.5 * rng.standard_normal(
                (m, dim), dtype=np.float32
            )
            vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
            w.add(np.arange(i0, i0 + m), vectors, v, rng.choice(counts_pool, m))
        w.commit(model="benchmark", model_files=files, data="generated",
                 data_fingerprint="generated", split="test", kind=kind)  # fmt: skip
    return time.perf_counter() - t0


def set_threads(n: int) -> None:
    """``n`` threads for torch and FAISS (OpenMP)."""
    import faiss

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


def rerank_latency(
    loaded, index, queries: list[list[int]], rerank: int, top: int
) -> tuple[list[float], list[float]]:
    """Per query (after three warm-up queries): (wall seconds, this process's CPU seconds)."""
    wall, cpu = [], []
    for q in [*queries[:3], *queries]:
        t0, c0 = time.perf_counter(), time.process_time()
        search_index(loaded.model, index, [q], top=top, rerank=rerank)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall[3:], cpu[3:]


def first_stage_latency(loaded, index, queries: list[list[int]], rerank: int) -> list[float]:
    """FAISS alone: the index's top K of each query's (precomputed) first-stage vector."""
    from shan.scoring import caption_vectors

    vectors = caption_vectors(loaded.model, queries, torch.device("cpu"))
    out = []
    for q in range(len(queries)):
        t0 = time.perf_counter()
        index.search(vectors[q : q + 1], rerank)
        out.append(time.perf_counter() - t0)
    return out


def exhaustive_latency(loaded, index, queries: list[list[int]], rows: int) -> list[float]:
    """The scorer over ``rows`` images of ``index`` (encoded once, as search's cache holds
    them), one query at a time."""
    images = index.images(loaded.model, np.arange(rows))
    out = []
    for q in [queries[0], *queries]:
        t0 = time.perf_counter()
        score_queries(loaded.model, images, [q])
        out.append(time.perf_counter() - t0)
    return out[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="a demo checkpoint with a first stage")
    p.add_argument("--data", required=True, help="the demo data set it was trained on")
    p.add_argument("--build-split", default="train", help="split indexed for the build speed")
    p.add_argument("--ray", action="store_true", help="also build through Ray Data actors")
    p.add_argument("--sizes", default="10000,100000,1000000", help="images, comma-separated")
    p.add_argument("--queries", type=int, default=100, help="rerank queries per size (100)")
    p.add_argument("--exhaustive-queries", type=int, default=10, help="exhaustive queries (10)")
    p.add_argument("--slice", type=int, default=10_000, help="exhaustive: images timed (10000)")
    p.add_argument("--rerank", type=int, default=100, help="K (100)")
    p.add_argument("--top", type=int, default=5, help="k (5)")
    p.add_argument("--threads", default="1,2", help="torch and FAISS threads, each (1,2)")
    p.add_argument("--kind", default="auto", help="FAISS kind (auto: what shan index build picks)")
    p.add_argument("--work", help="folder for the generated indexes (default: a temporary one)")
    p.add_argument("--out", default=str(RESULT), help="result file, or - for stdout only")
    args = p.parse_args()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    say(f"# python benchmarks/index_latency.py {' '.join(sys.argv[1:])} ({day})")
    say(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch "
        f"threads, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f} "
        "at the start")  # fmt: skip
    work = Path(args.work or tempfile.mkdtemp(prefix="shan-index-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work, say)
    finally:
        for child in work.glob("bench-*"):
            shutil.rmtree(child, ignore_errors=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    say(f"load average {os.getloadavg()[0]:.1f} at the end; generated indexes deleted")
    if args.out != "-":
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"written to {args.out}", file=sys.stderr)


def run(args: argparse.Namespace, work: Path, say) -> None:
    loaded = load_model(args.model)
    cfg = loaded.config
    files = file_digests(args.model)
    test = read_split(args.data, "test", max_words=cfg.data.max_words)
    say(f"model: {args.model} (d {cfg.model.d}, first stage {cfg.model.first_stage_dim}); "
        f"regions {test.features.shape[1]} per image; queries: captions of the demo test split; "
        f"K = {args.rerank}, k = {args.top}")  # fmt: skip

    say("\n## build (shan index build's job, demo data set)")
    builds = [("in this process (local)", IndexOptions(local=True))]
    if args.ray:
        builds.append(("Ray Data actors", IndexOptions()))
    for i, (what, opts) in enumerate(builds):
        dest = work / f"bench-build-{i}"
        t0 = time.perf_counter()
        r = build_index(
            args.model, args.data, args.build_split, str(dest), opts, log=lambda s: None
        )
        wall = time.perf_counter() - t0
        say(f"{what}: {r.card.images} images of {args.build_split} ({r.card.kind}): "
            f"{r.images_per_s:.0f} images/s encoding + writing ({r.seconds:.1f} s; "
            f"{wall:.1f} s with loading the model and reading the split)")  # fmt: skip
        shutil.rmtree(dest, ignore_errors=True)

    queries = test.tokens[: args.queries]
    say("\n## query latency, one query at a time (generated index of N images)")
    say("(wall time a query; the rerank's CPU time too: this process's, all its threads, which")
    say(" the other jobs of a shared machine inflate less than the wall time)")
    say(f"{'N':>9} {'kind':>18} {'write':>8} {'threads':>7} {'rerank K=' + str(args.rerank):>34} "
        f"{'(FAISS alone)':>16} {'exhaustive':>34}")  # fmt: skip
    for n in [int(s) for s in args.sizes.split(",") if s.strip()]:
        dest = work / f"bench-{n}"
        written = generate_index(
            dest, n, loaded, files, test.num_regions, k=test.features.shape[1], kind=args.kind
        )
        index = open_index(str(dest), model_files=files, data_fingerprint=None, name="benchmark")
        kind = index.card.kind + "".join(f" {k}={v}" for k, v in index.card.params.items())
        for threads in [int(t) for t in args.threads.split(",")]:
            set_threads(threads)
            rr, rr_cpu = rerank_latency(loaded, index, queries, args.rerank, args.top)
            fs_ = first_stage_latency(loaded, index, queries, args.rerank)
            rows = min(n, args.slice)
            ex = exhaustive_latency(loaded, index, queries[: args.exhaustive_queries], rows)
            scale = n / rows
            ex_note = "" if scale == 1 else f" (x{scale:.0f} of {rows:,})"
            ex_text = percentiles([s * scale for s in ex]) + ex_note
            say(f"{n:>9,} {kind:>18} {written:>7.0f}s {threads:>7} {percentiles(rr):>34} "
                f"{np.percentile(np.asarray(fs_) * 1000, 50):>13.2f} ms {ex_text}")  # fmt: skip
            say(f"{'':>9} {'':>18} {'':>8} {'CPU:':>7} {percentiles(rr_cpu):>34}")
        del index
        shutil.rmtree(dest, ignore_errors=True)


if __name__ == "__main__":
    main()
