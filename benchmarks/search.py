"""Search speed on CPU: the cold image index of a 1,000-image synthetic split (demo sizes: 16
regions of 64-d features) for a demo-size model (shan/configs/demo.yaml, random weights), the
warm load of that index from its cache file, and queries per second with the index in memory,
one query at a time and in a batch.

    python benchmarks/search.py                       # writes benchmarks/results/search_cpu.txt
    python benchmarks/search.py --images 5000 --batch 64 --out -
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import torch

from shan.config import load_config
from shan.data.reader import read_split
from shan.data.synthetic import generate_synthetic
from shan.fingerprint import index_key
from shan.model import SHAN
from shan.search.index import image_index
from shan.search.job import rank
from shan.search.query import parse_query
from shan.vocab import Vocabulary

RESULT = Path(__file__).resolve().parent / "results" / "search_cpu.txt"
SENTENCES = [
    "a red dog runs on the grass",
    "a small cat sits next to a blue ball",
    "a man holds a green umbrella",
    "two birds on a wooden fence",
]


def queries_per_second(fn, n_queries: int, min_seconds: float = 2.0) -> tuple[float, float]:
    """(queries/s, seconds per call) of ``fn`` (which answers ``n_queries``), after a warm-up."""
    fn()
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn()
        calls += 1
    per_call = (time.perf_counter() - t0) / calls
    return n_queries / per_call, per_call


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=1000, help="images in the split (1000)")
    p.add_argument("--batch", type=int, default=32, help="queries in the batch (32)")
    p.add_argument("--out", default=str(RESULT), help="result file, or - for stdout only")
    args = p.parse_args()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    cfg = load_config("demo")
    with tempfile.TemporaryDirectory() as d:
        root = str(Path(d, "data"))
        generate_synthetic(root, images={"test": args.images}, feature_dim=cfg.model.feature_dim,
                           log=lambda s: None)  # fmt: skip
        split = read_split(root, "test")
        vocab = Vocabulary.load(Path(root, "vocab.json"))
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = SHAN(cfg.model, len(vocab)).eval()
        day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
        say(f"# benchmarks/search.py --images {args.images} --batch {args.batch} ({day})")
        say(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
            f"torch threads, torch {torch.__version__}; load average "
            f"{os.getloadavg()[0]:.1f} at the start")  # fmt: skip
        say(f"model: demo config (d {cfg.model.d}, word_dim {cfg.model.word_dim}, d_a "
            f"{cfg.model.d_a}), random weights; split: {len(split.image_ids)} images x "
            f"{split.features.shape[1]} regions x {split.features.shape[2]}-d")  # fmt: skip
        key = index_key({"model.pt": "benchmark"}, "synthetic", "test")
        cache = str(Path(d, "cache"))
        args_ = (model, split.features, split.num_regions, split.image_ids)
        t0 = time.perf_counter()
        index, built = image_index(*args_, key=key, cache_dir=cache, log=lambda s: None)
        cold = time.perf_counter() - t0
        assert built
        t0 = time.perf_counter()
        index, built = image_index(*args_, key=key, cache_dir=cache, log=lambda s: None)
        warm = time.perf_counter() - t0
        assert not built
        size = Path(cache).joinpath(f"index-{key}.pt").stat().st_size / 2**20
        say(f"cold index build (encode + write {size:.0f} MB): {cold:.2f} s")
        say(f"warm index load from the cache file: {warm:.3f} s")
        tokens = [parse_query(vocab, s).tokens for s in SENTENCES]
        one = [tokens[0]]
        batch = [tokens[i % len(tokens)] for i in range(args.batch)]
        qps, per = queries_per_second(lambda: rank(model, index, one, 5), 1)
        say(f"single query, warm: {per * 1000:.1f} ms per query ({qps:.1f} queries/s)")
        qps, per = queries_per_second(lambda: rank(model, index, batch, 5), len(batch))
        say(f"batch of {len(batch)} queries, warm: {per * 1000:.0f} ms per batch "
            f"({qps:.1f} queries/s)")  # fmt: skip
    say(f"load average {os.getloadavg()[0]:.1f} at the end")
    if args.out != "-":
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
