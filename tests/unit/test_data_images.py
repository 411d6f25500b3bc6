"""From images and captions to a data set, in this process (``shan.extract``, ``--local``):
what the data set records, training a step on it, bad images skipped and reported. The Ray
path is ``tests/integration/test_images.py``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shan.data.format import DataError, load_card, load_vocab
from shan.data.reader import pad_tokens, read_split
from shan.data.validate import validate

pytestmark = pytest.mark.filterwarnings("ignore:no GloVe vectors")


def test_the_data_set_validates_and_records_its_images(converted_images):
    imgs, out = converted_images
    summary = validate(str(out))
    assert {s: v["images"] for s, v in summary["splits"].items()} == {"train": 4, "test": 2}
    assert summary["feature_shape"] == [4, 2048] and summary["images"] == str(imgs.resolve())
    card = load_card(str(out))
    assert card.has_images and card.has_boxes and card.reports == []
    test = read_split(str(out), "test")
    assert test.image_uris == [str(imgs.resolve() / "img4.jpg"), str(imgs.resolve() / "img5.png")]
    assert test.image_sizes.tolist() == [[72, 56], [72, 56]]
    assert test.boxes[0, 3].tolist() == [36, 28, 72, 56]  # the last cell, in image pixels
    assert test.captions == ["a blue square", "the square is blue", "a green square",
                             "the square is green"]  # fmt: skip


def test_a_shan_trains_a_step_on_it(converted_images):
    from shan.config import LossConfig, ModelConfig
    from shan.loss import TripletLoss
    from shan.model import SHAN

    _, out = converted_images
    data, vocab = read_split(str(out), "train"), load_vocab(str(out))
    torch.manual_seed(0)
    model = SHAN(ModelConfig(feature_dim=2048, d=16, word_dim=8, d_a=8), len(vocab))
    first = np.array([np.flatnonzero(data.caption_image == i)[0] for i in range(4)])
    feats = torch.from_numpy(data.features.astype(np.float32))
    tokens, lengths = pad_tokens([data.tokens[c] for c in first])
    scores = model(feats, torch.tensor(data.num_regions), tokens, lengths)
    loss = TripletLoss(LossConfig())(scores, image_ids=torch.arange(4))
    loss.backward()
    grad = model.img_fc.weight.grad  # the 2048 -> d image encoder
    assert torch.isfinite(loss) and loss > 0 and grad is not None and grad.abs().sum() > 0


def test_skip_lists_bad_images_in_a_report_of_the_data_set(tmp_path: Path):
    from shan.extract import convert_images
    from shan.features import ExtractorSpec
    from tests.helpers import make_images

    imgs = make_images(tmp_path / "imgs", 4)
    (imgs / "img1.png").write_bytes(b"")
    out = tmp_path / "data"
    spec = ExtractorSpec(arch="resnet50", size=64, grid=2)
    convert_images(str(imgs), str(imgs / "captions.csv"), str(out), spec=spec, min_count=1,
                   on_bad_image="skip", local=True, log=lambda s: None)  # fmt: skip
    card = load_card(str(out))
    assert card.reports == ["bad_images.json"] and "bad_images.json" in card.checksums
    report = json.loads((out / "bad_images.json").read_text())["bad_images"]
    assert report == [
        {"image": "img1.png", "error": "empty file (0 bytes)", "captions_left_out": 2}
    ]
    assert validate(str(out))["splits"]["train"]["images"] == 3
    (out / "bad_images.json").write_text("{}")  # the report is part of the data set
    with pytest.raises(DataError, match="bad_images.json"):
        validate(str(out))
