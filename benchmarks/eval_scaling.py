"""Evaluation throughput on Ray actors: 1 actor vs 2 on this machine, and the time for the
Flickr30K test matrix (1,000 x 5,000) and COCO 5K (5,000 x 25,000), extrapolated from a
measured slice with real caption lengths.

    python benchmarks/eval_scaling.py [--images 48] [--captions 512]

A paper-sized SHAN (d 1024, d_a 256, 36 x 2048 regions, random weights) is saved as a
checkpoint; the slice is scored by the evaluation job's own tile pool (``shan.eval.tiles``) on
a local Ray instance, encoding included, actor start-up excluded. Each actor has one torch
thread, so the ratio measures how the pool scales, not how threads do.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import caption_lengths, hms, random_tokens  # noqa: E402

from shan.checkpoint import save_checkpoint  # noqa: E402
from shan.config import Config  # noqa: E402
from shan.eval import tiles  # noqa: E402
from shan.model import SHAN  # noqa: E402
from shan.vocab import Vocabulary  # noqa: E402


def measure(ckpt: Path, feats, counts, tokens, n_actors: int, cpus: int, tile: tuple) -> float:
    import ray

    files = [{p.name: p.read_bytes() for p in ckpt.iterdir()}]
    # the same resources per actor (1 torch thread) in both runs: scaling, not thread count
    pool = tiles.start_pool(files, n_actors, 0.5, 0, 1, False, None)
    ray.get([a.pid.remote() for a in pool.actors])  # started
    order = np.argsort([len(t) for t in tokens], kind="stable").tolist()
    plan = tiles.Plan(len(feats), len(tokens), tile[0], tile[1], order, f"bench-{n_actors}")
    out = tempfile.mkdtemp(prefix="shan-bench-eval-")
    try:
        t0 = time.perf_counter()
        tiles.compute(pool, plan, tiles.TileStore(out, plan), feats, counts, tokens)
        return len(feats) * len(tokens) / (time.perf_counter() - t0)
    finally:
        for a in pool.actors:
            ray.kill(a)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=48)
    p.add_argument("--captions", type=int, default=512)
    p.add_argument("--tile-images", type=int, default=16)
    p.add_argument("--tile-captions", type=int, default=128)
    args = p.parse_args()
    import ray

    cpus = 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    work = Path(tempfile.mkdtemp(prefix="shan-bench-ckpt-"))
    try:
        cfg, vocab = Config(), Vocabulary([f"w{i}" for i in range(8476)])
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_checkpoint(work, SHAN(cfg.model, len(vocab)), cfg, vocab)
        rng = np.random.default_rng(0)
        feats = rng.random((args.images, 36, 2048), dtype=np.float32).astype(np.float16)
        counts = np.full(args.images, 36)
        tile = (args.tile_images, args.tile_captions)
        rates = {}
        for name, source in (("f30k", "f30k_test_caps.txt"), ("coco", "coco_testall_caps.txt")):
            lengths, how = caption_lengths(args.captions, source=source)
            tokens = random_tokens(lengths, len(vocab))
            one = measure(work, feats, counts, tokens, 1, cpus, tile)
            two = measure(work, feats, counts, tokens, 2, cpus, tile)
            rates[name] = two
            print(
                f"{name} caption lengths ({how}, mean {lengths.mean():.1f}): "
                f"1 actor {one:,.0f} pairs/s, 2 actors {two:,.0f} pairs/s: "
                f"{two / one:.2f}x ({100 * two / one / 2:.0f}% scaling efficiency)"
            )
        print(f"slice {args.images} x {args.captions}, tiles {tile[0]} x {tile[1]}, {cpus} CPUs")
        print(
            f"extrapolated with 2 actors on this machine: Flickr30K 1K (1,000 x 5,000) "
            f"{hms(5e6 / rates['f30k'])}; COCO 5K (5,000 x 25,000) {hms(125e6 / rates['coco'])}"
        )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
