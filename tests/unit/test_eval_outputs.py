"""An evaluation's output folder (``shan.eval.outputs``): only its own files accepted, no
attention picture of an earlier run left, nothing written from a NaN matrix, what MLflow gets,
and the attention pictures drawn over the real image."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest

from shan.data.reader import read_split
from shan.errors import JobError
from shan.eval import outputs
from shan.eval.lock import LOCK_NAME
from shan.model import SCORES


def test_a_rerun_leaves_no_attention_picture_of_the_earlier_run(tmp_path):
    for i in range(4):
        (tmp_path / f"attention_{i}.png").write_bytes(b"old")
    for name in ("metrics.json", "recall.md", "sims_total.npy"):
        (tmp_path / name).write_bytes(b"x")
    outputs.mark_incomplete(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recall.md", "sims_total.npy"]


def test_only_an_evaluations_own_files_are_accepted_in_out(tmp_path):
    ours = [
        "sims_total.npy",
        "sims_g2g.npy",
        "index.json",
        "metrics.json",
        "recall.md",
        "recall_at_k.png",
        "attention_0.png",
        "attention_12.png",
        "promotion.json",
        LOCK_NAME,
        "tiles/model-0/plan.json",
        "tiles/model-1/tile-r00001-c00002.npz",
        "tiles/model-1/tile-r00001-c00002.npz.tmp-77",
        "tiles/model-1/plan.json.tmp-78",
        "v3/metrics.json",
        "v3/tiles/model-0/plan.json",
    ]
    for name in ours:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert outputs.foreign_entries(str(tmp_path)) == []
    outputs.check_out(str(tmp_path))
    for name in ("notes.txt", "tiles/model-0/mine.npz", "v3/x/y.txt", "sims_other.npy"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert outputs.foreign_entries(str(tmp_path)) == [
        "empty/",
        "notes.txt",
        "sims_other.npy",
        "tiles/model-0/mine.npz",
        "v3/x/",
    ]
    with pytest.raises(JobError, match=r"empty/, notes.txt, sims_other.npy and 2 more"):
        outputs.check_out(str(tmp_path))
    assert outputs.foreign_entries(str(tmp_path / "missing")) == []
    with pytest.raises(JobError, match="is a file"):
        outputs.check_out(str(tmp_path / "notes.txt"))


def test_outputs_with_a_nan_matrix_are_not_written(tmp_path):
    sims = {k: np.zeros((2, 3), np.float32) for k in SCORES}
    sims["g2g"][1, 1] = np.nan
    with pytest.raises(JobError, match="g2g matrix holds NaN"):
        outputs.write_outputs(str(tmp_path), sims, {}, {}, extra={}, recall_md="")
    assert list(tmp_path.iterdir()) == []


def test_files_too_large_for_mlflow_stay_out_of_the_local_copy(tmp_path):
    from shan.data.fs import StorageError

    (tmp_path / "small.json").write_bytes(b"x" * 10)
    (tmp_path / "sims_total.npy").write_bytes(b"x" * 100)
    local, kept = outputs.local_copy(str(tmp_path), ["small.json", "sims_total.npy"], max_bytes=50)
    try:
        assert kept == ["small.json"]
        assert sorted(p.name for p in Path(local).iterdir()) == ["small.json"]
    finally:
        shutil.rmtree(local)
    with pytest.raises(StorageError, match="missing.npy"):
        outputs.local_copy(str(tmp_path), ["missing.npy"], max_bytes=50)


# -- attention pictures ----------------------------------------------------------------------------
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
    pics = outputs.attention_pictures(
        model, vocab, data, rows=np.arange(4), sims=sims, cap_rows=data.caption_image, n=1
    )
    red = COLOURS["red"]  # image 0 is a red circle on grey
    assert colour_share(pics["attention_0.png"], red) > 0.02
    data.image_uris = None  # no recorded images: boxes alone, no red
    pics = outputs.attention_pictures(
        model, vocab, data, rows=np.arange(4), sims=sims, cap_rows=data.caption_image, n=1
    )
    assert colour_share(pics["attention_0.png"], red) < 0.002


def test_word_region_attention_is_each_words_distribution_over_the_regions():
    import torch

    from tests.helpers import tiny_model

    model = tiny_model().float()
    features = np.random.default_rng(0).normal(size=(6, 12)).astype(np.float32)
    beta = outputs.word_region_attention(model, features, 4, [1, 5, 9, 2])  # 4 real regions
    assert beta.shape == (4, 4) and beta.dtype == np.float32
    np.testing.assert_allclose(beta.sum(0), np.ones(4), rtol=1e-5)
    im = model.encode_images(torch.from_numpy(features[:4])[None])
    cap = model.encode_captions(torch.tensor([[1, 5, 9, 2]]), torch.tensor([4]))
    with torch.no_grad():
        expected = model.l2l_attention(im, cap)[1][0].numpy()  # the model's own L2L beta
    np.testing.assert_allclose(beta, expected, rtol=1e-5, atol=1e-6)


def test_an_attention_picture_of_a_200000_word_caption_has_a_one_line_title():
    import time

    words = ["<start>", *["dog"] * 80, "<end>"]
    beta = np.full((4, len(words)), 0.25, dtype=np.float32)
    t0 = time.perf_counter()
    png = outputs.plot_attention(words, beta, None, "image 7: " + "dog " * 200_000)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert time.perf_counter() - t0 < 60  # the whole caption as a title: minutes of layout
