"""Small builders shared by the unit tests."""

from __future__ import annotations

import torch

from shan.config import ModelConfig
from shan.model import SHAN


def tiny_config(**kw) -> ModelConfig:
    base = dict(feature_dim=12, d=16, word_dim=6, d_a=8)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, vocab_size: int = 30, **kw) -> SHAN:
    torch.manual_seed(seed)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(tiny_config(**kw), vocab_size).double()
    model.eval()
    return model


def random_batch(ni=3, nc=4, k=5, n=7, feature_dim=12, vocab_size=30, seed=1):
    """features (ni, k, F), counts (ni,), tokens (nc, n), lengths (nc,); padding is random."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(ni, k, feature_dim, generator=g, dtype=torch.float64)
    counts = torch.randint(1, k + 1, (ni,), generator=g)
    counts[0] = k
    lengths = torch.randint(1, n + 1, (nc,), generator=g)
    lengths[0] = n
    tokens = torch.randint(1, vocab_size, (nc, n), generator=g)
    return features, counts, tokens, lengths
