"""Attention pictures (``shan.pictures``): the L2L weights of each word over the regions, drawn
over the real image (or the boxes alone), and the mark a program puts in the PNGs it writes."""

from __future__ import annotations

import io

import numpy as np
import pytest

from shan import pictures
from shan.data.reader import read_split


def colour_share(png: bytes, rgb) -> float:
    """Share of the picture's pixels within 40 of the colour ``rgb``."""
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return float((np.abs(a - np.array(rgb)).max(axis=2) < 40).mean())


@pytest.mark.filterwarnings("ignore:no GloVe vectors")
def test_attention_is_drawn_over_the_real_image(converted_images):
    from shan.config import ModelConfig
    from shan.data.format import load_vocab
    from shan.model import SHAN
    from tests.helpers import COLOURS

    _, out = converted_images
    data, vocab = read_split(str(out), "train"), load_vocab(str(out))
    model = SHAN(ModelConfig(feature_dim=2048, d=16, word_dim=8, d_a=8), len(vocab))
    sims = np.eye(4)[:, data.caption_image]  # every image ranked right on its captions
    pics = pictures.attention_pictures(
        model, vocab, data, rows=np.arange(4), sims=sims, cap_rows=data.caption_image, n=1
    )
    red = COLOURS["red"]  # image 0 is a red circle on grey
    assert colour_share(pics["attention_0.png"], red) > 0.02
    data.image_uris = None  # no recorded images: boxes alone, no red
    pics = pictures.attention_pictures(
        model, vocab, data, rows=np.arange(4), sims=sims, cap_rows=data.caption_image, n=1
    )
    assert colour_share(pics["attention_0.png"], red) < 0.002


def test_word_region_attention_is_each_words_distribution_over_the_regions():
    import torch

    from tests.helpers import tiny_model

    model = tiny_model().float()
    features = np.random.default_rng(0).normal(size=(6, 12)).astype(np.float32)
    beta = pictures.word_region_attention(model, features, 4, [1, 5, 9, 2])  # 4 real regions
    assert beta.shape == (4, 4) and beta.dtype == np.float32
    np.testing.assert_allclose(beta.sum(0), np.ones(4), rtol=1e-5)
    im = model.encode_images(torch.from_numpy(features[:4])[None])
    cap = model.encode_captions(torch.tensor([[1, 5, 9, 2]]), torch.tensor([4]))
    with torch.no_grad():
        expected = model.l2l_attention(im, cap)[1][0].numpy()  # the model's own L2L beta
    np.testing.assert_allclose(beta, expected, rtol=1e-5, atol=1e-6)


def test_a_marked_png_is_still_the_same_picture():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 10, 10)).save(buf, format="PNG")
    marked = pictures.marked_png(buf.getvalue(), b"shan test")
    assert b"tEXtSoftware\0shan test" in marked
    with Image.open(io.BytesIO(marked)) as im:
        im.load()  # every chunk's CRC checked
        assert im.size == (3, 2) and im.info["Software"] == "shan test"
        assert im.convert("RGB").getpixel((1, 1)) == (200, 10, 10)


def test_an_attention_picture_of_a_200000_word_caption_has_a_one_line_title():
    """A caption of any length is cut to a one-line title (the whole caption as a title took
    minutes of layout); pytest's timeout is the guard."""
    words = ["<start>", *["dog"] * 80, "<end>"]
    beta = np.full((4, len(words)), 0.25, dtype=np.float32)
    png = pictures.plot_attention(words, beta, None, "image 7: " + "dog " * 200_000)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
