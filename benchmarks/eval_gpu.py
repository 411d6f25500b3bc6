"""Scoring throughput on one device for a COCO-5K-sized matrix (no Ray: the scorer alone).

    python benchmarks/eval_gpu.py [--images 500] [--captions 5000] [--device cuda]

A paper-sized SHAN (d 1024, d_a 256, 36 x 2048 regions) scores a slice of images x captions
with real COCO caption lengths through the library path the evaluation actors use (encode,
then block-wise fast scoring, bf16 autocast on CUDA); prints pairs/s and the extrapolated time
for the whole COCO 5K matrix (5,000 x 25,000) and the Flickr30K test matrix (1,000 x 5,000).
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from common import caption_lengths, hms, random_tokens, timer

from shan.config import ModelConfig
from shan.model import SHAN
from shan.scoring import score_matrix


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--blocks", type=int, nargs="+", default=[64, 128])
    p.add_argument("--no-bf16", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(ModelConfig(), vocab_size=8480).to(device).eval()
    rng = np.random.default_rng(0)
    feats = rng.random((args.images, 36, 2048), dtype=np.float32).astype(np.float16)
    counts = np.full(args.images, 36)
    lengths, source = caption_lengths(args.captions, source="coco_testall_caps.txt")
    tokens = random_tokens(lengths, 8480)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    pairs = args.images * args.captions
    print(
        f"device {name}; slice {args.images} x {args.captions} = {pairs:,} pairs; d 1024, "
        f"d_a 256, 36 regions; caption lengths {source} (mean {lengths.mean():.1f}); "
        f"bf16 {not args.no_bf16 and device.type == 'cuda'}"
    )
    best = 0.0
    for block in args.blocks:
        kw = dict(block=block, bf16=not args.no_bf16, image_chunk=256, caption_chunk=2048)
        score_matrix(model, feats[:64], counts[:64], tokens[:512], device, **kw)  # warm-up
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        elapsed = timer(device)
        score_matrix(model, feats, counts, tokens, device, **kw)
        rate = pairs / elapsed()
        best = max(best, rate)
        mem = (
            f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
            if device.type == "cuda"
            else ""
        )
        print(f"block {block}: {rate:,.0f} pairs/s{mem}")
    print(
        f"extrapolated at {best:,.0f} pairs/s: COCO 5K (125,000,000 pairs) "
        f"{hms(125e6 / best)}; Flickr30K 1K (5,000,000 pairs) {hms(5e6 / best)}"
    )


if __name__ == "__main__":
    main()
