"""Helpers shared by the benchmarks: real caption lengths, device timing."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "scan_precomp"


def caption_lengths(n: int, seed: int = 0, source: str = "f30k_test_caps.txt"):
    """(n token counts with <start> and <end>, where they came from): real captions when the
    SCAN caption files are at hand, else a normal fit to them."""
    from shan.vocab import tokenize

    rng = np.random.default_rng(seed)
    path = SHARED / source
    if path.is_file():
        real = [len(tokenize(line)) + 2 for line in path.read_text().splitlines() if line.strip()]
        return rng.choice(real, size=n), f"drawn from {path.name}"
    lengths = np.clip(rng.normal(14.5, 5.0, size=n).round(), 5, 80).astype(int)
    return lengths, "normal(14.5, 5), no caption file at hand"


def random_tokens(lengths: np.ndarray, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(4, vocab_size, size=int(n) - 2).tolist(), 2] for n in lengths]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timer(device: torch.device):
    sync(device)
    t0 = time.perf_counter()

    def elapsed() -> float:
        sync(device)
        return time.perf_counter() - t0

    return elapsed


def hms(seconds: float) -> str:
    """Minutes, or hours past one hour."""
    return f"{seconds / 3600:.1f} h" if seconds > 3600 else f"{seconds / 60:.1f} min"
