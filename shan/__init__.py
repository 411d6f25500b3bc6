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

from shan.config import Config, ConfigError, ModelConfig, load_config
from shan.loss import TripletLoss, triplet_loss
from shan.metrics import fold_metrics, recall_metrics
from shan.model import SHAN, STEPS, EncodedCaptions, EncodedImages, build_model
from shan.vocab import Vocabulary, tokenize

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
    "recall_metrics",
    "tokenize",
    "triplet_loss",
]
__version__ = "0.1.0"
