"""Training throughput at the f30k config's sizes on one device (no Ray: the step alone).

    python benchmarks/train_gpu.py [--batch 128] [--steps 10] [--device cuda] [key=value ...]

Random 36 x 2048 features and token ids with real caption lengths; the f30k config (d 1024,
d_a 256, batch 128), bf16 autocast on CUDA, Adam, gradient clipping: the same step as the
training job. Prints examples/s and peak GPU memory.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from common import caption_lengths, random_tokens, timer

from shan.config import load_config
from shan.data.reader import pad_tokens
from shan.loss import TripletLoss
from shan.model import SHAN
from shan.scoring import autocast


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="f30k")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    device = torch.device(args.device)
    b, vocab_size = cfg.optim.batch_size, 8480
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(cfg.model, vocab_size).to(device).train()
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=cfg.optim.lr)
    loss_fn = TripletLoss(cfg.loss)
    lengths, source = caption_lengths(b * (args.steps + args.warmup), seed=1)
    rng = np.random.default_rng(0)
    feats = torch.from_numpy(rng.random((b, 36, cfg.model.feature_dim), dtype=np.float32))
    feats, counts = feats.to(device), torch.full((b,), 36, device=device)
    ids = torch.arange(b, device=device)

    def step(i: int) -> float:
        toks, lens = pad_tokens(random_tokens(lengths[i * b : (i + 1) * b], vocab_size, seed=i))
        with autocast(device, cfg.scaling.bf16):
            scores = model(
                feats,
                counts,
                toks.to(device),
                lens.to(device),
                block=cfg.scaling.score_block,
                checkpoint=cfg.scaling.checkpoint_blocks,
            )
            loss = loss_fn(scores, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        return loss.item()

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elapsed = timer(device)
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    seconds = elapsed()
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(
        f"device {name}; config {cfg.name}: batch {b}, d {cfg.model.d}, d_a {cfg.model.d_a}, "
        f"36 regions, caption lengths {source}, bf16 {cfg.scaling.bf16 and device.type == 'cuda'}"
        f", score block {cfg.scaling.score_block or 'default'}, "
        f"checkpointed blocks {cfg.scaling.checkpoint_blocks}"
    )
    print(
        f"training: {b * args.steps / seconds:.1f} examples/s ({args.steps} steps, "
        f"{1000 * seconds / args.steps:.0f} ms/step), last loss {loss:.3f}"
    )
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
