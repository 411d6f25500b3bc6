"""From images and captions to a data set: captions formats, the conversion (in process, and
through Ray in the integration test), what the data set records, training and attention
pictures on it, bad images skipped and reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from shan.data.captions import read_captions
from shan.data.format import DataError, load_card, load_vocab
from shan.data.images import convert_images
from shan.data.reader import pad_tokens, read_split
from shan.data.validate import validate
from shan.features import ExtractorSpec
from tests.cli import run_job
from tests.helpers import make_images

pytestmark = pytest.mark.filterwarnings("ignore:no GloVe vectors")
SPEC = ExtractorSpec(arch="resnet50", size=64, grid=2)  # 4 regions of 2048-d, fast on CPU
SPLITS = lambda i: "train" if i < 4 else "test"  # noqa: E731


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """(images folder, data set) of 6 images in two splits, converted in this process."""
    tmp = tmp_path_factory.mktemp("images")
    imgs = make_images(tmp / "imgs", 6, split=SPLITS)
    out = tmp / "data"
    convert_images(str(imgs), str(imgs / "captions.csv"), str(out), SPEC, min_count=1,
                   local=True, log=lambda s: None)  # fmt: skip
    return imgs, out


def test_the_data_set_validates_and_records_its_images(converted):
    imgs, out = converted
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


def test_a_shan_trains_a_step_on_it(converted):
    from shan.config import LossConfig, ModelConfig
    from shan.loss import TripletLoss
    from shan.model import SHAN

    _, out = converted
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


def colour_share(png: bytes, rgb) -> float:
    """Share of the picture's pixels within 40 of the colour ``rgb``."""
    import io

    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return float((np.abs(a - np.array(rgb)).max(axis=2) < 40).mean())


def test_attention_is_drawn_over_the_real_image(converted):
    from shan.eval.outputs import attention_pictures
    from tests.helpers import COLOURS

    _, out = converted
    data, vocab = read_split(str(out), "train"), load_vocab(str(out))
    from shan.config import ModelConfig
    from shan.model import SHAN

    model = SHAN(ModelConfig(feature_dim=2048, d=16, word_dim=8, d_a=8), len(vocab))
    sims = np.eye(4)[:, data.caption_image]  # every image ranked right on its captions
    pics = attention_pictures(model, vocab, data, np.arange(4), sims, data.caption_image, n=1)
    red = COLOURS["red"]  # image 0 is a red circle on grey
    assert colour_share(pics["attention_0.png"], red) > 0.02
    data.image_uris = None  # no recorded images: boxes alone, no red
    pics = attention_pictures(model, vocab, data, np.arange(4), sims, data.caption_image, n=1)
    assert colour_share(pics["attention_0.png"], red) < 0.002


def test_caption_formats(tmp_path: Path):
    (tmp_path / "c.jsonl").write_text('{"image": "a.jpg", "caption": "x y"}\n'
                                      '{"image": "b.png", "caption": "z"}\n'
                                      '{"image": "a.jpg", "caption": "w"}\n')  # fmt: skip
    got = read_captions(str(tmp_path / "c.jsonl"), split="dev")
    assert list(got) == ["dev"] and got["dev"]["a.jpg"].captions == ["x y", "w"]
    (tmp_path / "caps.txt").write_text("one\ntwo\nthree\nfour\n")
    (tmp_path / "list.txt").write_text("p.jpg\nq.jpg\n")
    got = read_captions(str(tmp_path / "caps.txt"), image_list=str(tmp_path / "list.txt"))
    assert {k: v.captions for k, v in got["train"].items()} == {
        "p.jpg": ["one", "two"],
        "q.jpg": ["three", "four"],
    }
    (tmp_path / "s.csv").write_text("image,caption,split\na.jpg,x,train\nb.jpg,y,test\n")
    assert list(read_captions(str(tmp_path / "s.csv"))) == ["train", "test"]
    with pytest.raises(DataError, match="drop --split"):
        read_captions(str(tmp_path / "s.csv"), split="train")


def test_skip_lists_bad_images_in_a_report_of_the_data_set(tmp_path: Path):
    imgs = make_images(tmp_path / "imgs", 4)
    (imgs / "img1.png").write_bytes(b"")
    out = tmp_path / "data"
    convert_images(str(imgs), str(imgs / "captions.csv"), str(out), SPEC, min_count=1,
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


@pytest.mark.integration
def test_the_job_extracts_on_ray_and_matches_the_in_process_result(converted, tmp_path: Path):
    """Real Ray (a local instance started by the job), one image of the folder bad and
    skipped: the same features as the in-process conversion for the others."""
    imgs, local_out = converted
    ray_imgs = make_images(tmp_path / "imgs", 6, split=SPLITS)
    (ray_imgs / "img5.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "ray-data"
    env = {"RAY_ADDRESS": None}  # a local instance of its own, token authentication on
    r = run_job("prepare_data", "images", str(ray_imgs), "--captions",
                str(ray_imgs / "captions.csv"), "--out", str(out), "--arch", "resnet50",
                "--image-size", "64", "--grid", "2", "--min-count", "1",
                "--on-bad-image", "skip", "--batch-size", "2", env=env, timeout=240)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "images 6/6 (100%)" in r.stderr and "left out 1 bad image" in r.stdout
    summary = validate(str(out))
    assert {s: v["images"] for s, v in summary["splits"].items()} == {"train": 4, "test": 1}
    ray_train, local_train = read_split(str(out), "train"), read_split(str(local_out), "train")
    np.testing.assert_array_equal(ray_train.image_ids, local_train.image_ids)
    np.testing.assert_allclose(ray_train.features.astype(np.float32),
                               local_train.features.astype(np.float32), atol=2e-3)  # fmt: skip
    report = json.loads((out / "bad_images.json").read_text())["bad_images"]
    assert [b["image"] for b in report] == ["img5.png"]
