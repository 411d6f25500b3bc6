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
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import caption_lengths, hms, random_tokens

from shan.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from shan.config import Config
from shan.data.reader import SplitArrays
from shan.eval import tiles
from shan.model import SHAN
from shan.runtime import Resources
from shan.vocab import Vocabulary


def measure(ckpt: Checkpoint, data: SplitArrays, n_actors: int, tile: tuple[int, int]) -> float:
    import ray

    # the same resources per actor (1 torch thread) in both runs: scaling, not thread count
    res = Resources(count=n_actors, use_gpu=False, cpus_each=0.5, gpus_each=0.0, torch_threads=1)
    pool = tiles.start_pool([ckpt], res, bf16=False, block=None)
    ray.get([a.pid.remote() for a in pool.actors])  # started
    n_images, n_captions = len(data.image_ids), len(data.tokens)
    order = np.argsort([len(t) for t in data.tokens], kind="stable").tolist()
    plan = tiles.Plan(n_images, n_captions, tile[0], tile[1], order, f"bench-{n_actors}")
    out = tempfile.mkdtemp(prefix="shan-bench-eval-")
    try:
        t0 = time.perf_counter()
        tiles.compute(pool, plan, tiles.TileStore(out, plan), data)
        return n_images * n_captions / (time.perf_counter() - t0)
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
            model = SHAN(cfg.model, len(vocab))
        save_checkpoint(work, Checkpoint(weights=model.state_dict(), config=cfg, vocab=vocab))
        ckpt = load_checkpoint(work).weights_only()  # as the evaluation job loads it
        rng = np.random.default_rng(0)
        feats = rng.random((args.images, 36, 2048), dtype=np.float32).astype(np.float16)
        counts = np.full(args.images, 36)
        tile = (args.tile_images, args.tile_captions)
        rates = {}
        for name, source in (("f30k", "f30k_test_caps.txt"), ("coco", "coco_testall_caps.txt")):
            lengths, how = caption_lengths(args.captions, source=source)
            tokens = random_tokens(lengths, len(vocab))
            data = SplitArrays(
                image_ids=np.arange(args.images),
                features=feats,
                num_regions=counts,
                tokens=tokens,
                captions=[""] * len(tokens),
                caption_image=np.zeros(len(tokens), dtype=np.int64),
            )
            one = measure(ckpt, data, 1, tile)
            two = measure(ckpt, data, 2, tile)
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
