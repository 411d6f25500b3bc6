"""Whole-split scoring (``shan.scoring``): chunked, length-sorted scoring gives the matrix that
one call of the model's scorer gives, and the split's recall metrics per score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shan.data.reader import pad_tokens
from shan.metrics import recall_metrics
from shan.model import SCORES
from shan.scoring import IMAGE_FIELDS, autocast, encode_images, score_matrix, split_metrics
from tests.helpers import tiny_model

CPU = torch.device("cpu")


def split(ni: int = 7, per: int = 2, k: int = 5, seed: int = 3):
    """(features (ni, k, 12), region counts (ni,), tokens: per captions an image, lengths 2..9)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(ni, k, 12)).astype(np.float32)
    counts = rng.integers(1, k + 1, size=ni)
    tokens = [rng.integers(4, 30, size=int(rng.integers(2, 10))).tolist() for _ in range(ni * per)]
    return features, counts, tokens


def test_chunks_and_length_order_do_not_change_the_matrix():
    model = tiny_model().float().eval()
    features, counts, tokens = split()
    got = score_matrix(model, features, counts, tokens, CPU, image_chunk=3, caption_chunk=4)
    with torch.no_grad():
        im = model.encode_images(torch.from_numpy(features), torch.from_numpy(counts))
        toks, lens = pad_tokens(tokens)
        want = model.score(im, model.encode_captions(toks, lens))
    assert list(got) == list(SCORES)
    for key in SCORES:
        assert got[key].shape == (7, 14) and got[key].dtype == np.float32
        np.testing.assert_allclose(got[key], want[key].numpy(), atol=1e-5)


def test_the_chunked_encoder_gives_the_images_encoded_at_once():
    model = tiny_model().float()
    features, counts, _ = split(ni=7)
    sizes: list[int] = []
    got = encode_images(model, features.astype(np.float16), counts, CPU, chunk=3,
                        report=sizes.append)  # fmt: skip
    assert sizes == [3, 3, 1] and not model.training
    with torch.no_grad():
        feats = torch.from_numpy(features.astype(np.float16).astype(np.float32))
        want = model.encode_images(feats, torch.from_numpy(counts))
    for f in IMAGE_FIELDS:
        a, b = getattr(got, f), getattr(want, f)
        assert a.device.type == "cpu" and a.dtype == b.dtype and not a.requires_grad
        assert torch.equal(a, b) if f == "mask" else torch.allclose(a, b, atol=1e-6), f
    assert got.vg.shape == (7, 5, 2 * got.v.shape[-1])


def test_the_tile_actors_encode_with_the_same_encoder():
    from shan.eval.tiles import TileScorer

    model = tiny_model().float()
    features, counts, _ = split(ni=4)
    actor = object.__new__(TileScorer)  # no Ray: the models set by hand
    actor.models, actor.device, actor.bf16 = [model], CPU, True
    v, mask = actor.encode_images(0, features, counts)
    want = encode_images(model, features, counts, CPU, chunk=4)
    assert v.dtype == np.float32 and mask.dtype == bool
    np.testing.assert_array_equal(v, want.v.numpy())
    np.testing.assert_array_equal(mask, want.mask.numpy())


def test_split_metrics_per_score():
    model = tiny_model().float().eval()
    features, counts, tokens = split()
    sims = score_matrix(model, features, counts, tokens, CPU)
    caption_image = np.repeat(np.arange(7), 2)
    metrics = split_metrics(sims, caption_image)
    assert list(metrics) == list(SCORES)
    assert metrics["g2l"] == recall_metrics(sims["g2l"], caption_image)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_autocast_is_bf16_on_cuda_only():
    with autocast(CPU, bf16=True):
        assert not torch.is_autocast_enabled("cpu")
    ctx = autocast(torch.device("cuda"), bf16=True)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
    assert not isinstance(autocast(torch.device("cuda"), bf16=False), torch.autocast)
