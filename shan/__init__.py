"""SHAN for image-text matching: the model, its scorer, loss, metrics, configs and data tools.

Public API::

    import shan
    cfg = shan.load_config("demo")                   # or shan.Config()
    vocab = shan.Vocabulary.load("vocab.json")
    model = shan.build_model(cfg.model, vocab)
    images = model.encode_images(features, counts)   # (Ni, k, F), (Ni,) region counts
    captions = model.encode_captions(tokens, lengths)  # (Nc, n) ids, (Nc,) lengths
    sims = model.score(images, captions)             # {"total", "l2l", "g2l", "g2g"}: (Ni, Nc)
"""

import importlib
from typing import Any

_EXPORTS = {
    "Config": "shan.config",
    "ConfigError": "shan.config",
    "ModelConfig": "shan.config",
    "load_config": "shan.config",
    "TripletLoss": "shan.loss",
    "triplet_loss": "shan.loss",
    "fold_metrics": "shan.metrics",
    "recall_metrics": "shan.metrics",
    "SHAN": "shan.model",
    "STEPS": "shan.model",
    "EncodedCaptions": "shan.model",
    "EncodedImages": "shan.model",
    "build_model": "shan.model",
    "Vocabulary": "shan.vocab",
    "tokenize": "shan.vocab",
    "pad_tokens": "shan.data.reader",
}


def __getattr__(name: str) -> Any:
    """Import on first use, so that data tools do not load torch."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'shan' has no attribute {name!r}")


__all__ = [
    "SHAN",
    "STEPS",
    "Config",
    "ConfigError",
    "EncodedCaptions",
    "EncodedImages",
    "ModelConfig",
    "TripletLoss",
    "Vocabulary",
    "build_model",
    "fold_metrics",
    "load_config",
    "pad_tokens",
    "recall_metrics",
    "tokenize",
    "triplet_loss",
]
__version__ = "0.1.0"
