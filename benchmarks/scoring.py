"""Fast scorer vs the literal scorer at the paper's sizes (docs/model.md §8).

    python benchmarks/scoring.py [--images 32] [--captions 32] [--literal-pairs 32] [--device cpu]

Prints pairs/s of each scorer on the same encoded inputs, their ratio, the largest absolute
difference on the pairs both scored, and the fast scorer's achieved GFLOP/s (useful
multiply-adds counted as in docs/model.md §8: 6 k n d + (k + n) d d_a per pair, 2 FLOPs each)
next to a float32 matrix-multiply GFLOP/s measured in the same run.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from common import caption_lengths, sync

from shan.config import ModelConfig
from shan.model import SHAN
from shan.reference import score_literal


def matmul_gflops(device: torch.device, size: int = 2048, reps: int = 10) -> float:
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - t0) / 1e9


def timed(fn, device, reps: int = 1) -> tuple[float, object]:
    out = fn()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / reps, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--captions", type=int, default=32)
    p.add_argument("--literal-pairs", type=int, default=32, help="pairs the literal scorer times")
    p.add_argument("--block", type=int, default=None, help="default: 8 on CPU, 64 on GPU")
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--d", type=int, default=1024)
    p.add_argument("--d-a", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = ModelConfig(d=args.d, d_a=args.d_a)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(cfg, vocab_size=1000).to(device).eval()
    lengths, source = caption_lengths(args.captions)
    n = int(lengths.max())
    k = args.regions
    features = torch.randn(args.images, k, cfg.feature_dim, device=device)
    tokens = torch.randint(4, 1000, (args.captions, n), device=device)
    with torch.no_grad():
        im = model.encode_images(features)
        cap = model.encode_captions(tokens, torch.as_tensor(lengths))
        t_fast, fast = timed(lambda: model.score(im, cap, block=args.block), device, args.reps)
        ni_l = max(1, min(args.images, args.literal_pairs // args.captions))
        nc_l = min(args.captions, args.literal_pairs // ni_l)
        t_lit, lit = timed(lambda: score_literal(model, im[:ni_l], cap[:nc_l]), device)
    pairs_fast = args.images * args.captions / t_fast
    pairs_lit = ni_l * nc_l / t_lit
    diff = max((fast[key][:ni_l, :nc_l] - lit[key]).abs().max().item() for key in lit)
    mean_n = float(lengths.mean())
    flops_pair = 2 * (6 * k * mean_n * cfg.d + (k + mean_n) * cfg.d * cfg.d_a)
    achieved = pairs_fast * flops_pair / 1e9
    mm = matmul_gflops(device)
    print(f"device {device}, threads {torch.get_num_threads()}, k {k}, d {cfg.d}, d_a {cfg.d_a}")
    print(f"caption lengths {source}: mean {mean_n:.1f}, max {n} (padded to {n})")
    print(f"fast scorer:    {pairs_fast:10.1f} pairs/s  ({args.images}x{args.captions} pairs)")
    print(f"literal scorer: {pairs_lit:10.1f} pairs/s  ({ni_l}x{nc_l} pairs)")
    print(f"speed-up:       {pairs_fast / pairs_lit:10.1f}x")
    print(f"max |fast - literal|: {diff:.2e}")
    print(f"useful MFLOP per pair {flops_pair / 1e6:.1f}; fast scorer {achieved:.1f} GFLOP/s")
    print(f"float32 matmul {mm:.1f} GFLOP/s; fast scorer at {100 * achieved / mm:.0f}% of it")


if __name__ == "__main__":
    main()
