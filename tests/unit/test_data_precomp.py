"""Converting a SCAN precomp folder (``shan.data.precomp``): every caption with its image and
the features kept, the folder's vocabulary used, and each bad input named, with nothing left
at the destination."""

import json

import numpy as np
import pytest

from shan.data.format import DataError, load_card
from shan.data.precomp import convert_precomp
from shan.data.reader import read_split
from shan.data.validate import validate
from shan.vocab import VocabError, Vocabulary, tokenizer_id
from tests.helpers import make_precomp, quiet


def test_convert_keeps_every_caption_with_its_image_and_the_features(tmp_path):
    src = make_precomp(tmp_path / "src")
    convert_precomp(str(src), str(tmp_path / "out"), chunk_rows=5, rows_per_file=7, log=quiet)
    card = load_card(str(tmp_path / "out"))
    assert card.splits["train"].images == 12 and card.splits["train"].captions == 60
    assert len(card.splits["train"].files) == 2  # 7 + 5 rows
    data = read_split(str(tmp_path / "out"), "train")
    lines = (src / "train_caps.txt").read_text().split("\n")
    assert data.captions == lines  # exact text, in order
    assert data.caption_image.tolist() == [i for i in range(12) for _ in range(5)]
    ims = np.load(src / "train_ims.npy")
    np.testing.assert_allclose(data.features.astype(np.float32), ims, rtol=1e-3, atol=1e-3)
    vocab = Vocabulary.load(tmp_path / "out" / "vocab.json")
    assert data.tokens[0] == vocab.encode(lines[0])
    assert card.tokenizer == tokenizer_id() and card.tokenizer.startswith("nltk ")
    assert validate(str(tmp_path / "out"))["splits"]["dev"]["captions"] == 60


def test_the_data_set_is_named_after_the_folder_or_name(tmp_path):
    """A loop variable once overwrote ``name``: every data set was called "rows_per_file"."""
    src = make_precomp(tmp_path / "f30k_precomp", splits=("dev",))
    convert_precomp(str(src), str(tmp_path / "a"), log=quiet)
    assert load_card(str(tmp_path / "a")).name == "f30k_precomp"
    convert_precomp(str(src), str(tmp_path / "b"), name="mine", log=quiet)
    assert load_card(str(tmp_path / "b")).name == "mine"


def test_convert_uses_the_folder_vocab(tmp_path):
    src = make_precomp(tmp_path / "src", splits=("test",))
    Vocabulary(["dog", "cat"]).save(src / "x_precomp_vocab.json")
    convert_precomp(str(src), str(tmp_path / "out"), log=quiet)
    data = read_split(str(tmp_path / "out"), "test")
    assert set(t for toks in data.tokens for t in toks) <= {1, 2, 3, 4, 5}


def _expect_error(src, tmp_path, match, **kw):
    out = tmp_path / "out"
    with pytest.raises((DataError, VocabError), match=match):
        convert_precomp(str(src), str(out), log=quiet, **kw)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]


def test_missing_split_file(tmp_path):
    src = make_precomp(tmp_path / "src")
    (src / "dev_caps.txt").unlink()
    _expect_error(src, tmp_path, "dev_caps.txt does not exist")
    _expect_error(src, tmp_path, "test_ims.npy does not exist", splits=["test"])


def test_wrong_shape_and_dtype(tmp_path):
    src = make_precomp(tmp_path / "src")
    np.save(src / "dev_ims.npy", np.zeros((12, 24), np.float32))
    _expect_error(src, tmp_path, r"dev_ims.npy: features must be \(images, regions, dim\)")
    np.save(src / "dev_ims.npy", np.zeros((12, 4, 6), np.int32))
    _expect_error(src, tmp_path, "dev_ims.npy: features must be floating point")
    np.save(src / "dev_ims.npy", np.zeros((12, 5, 6), np.float32))
    _expect_error(src, tmp_path, "different feature shapes")


@pytest.mark.parametrize("bad", [np.nan, np.inf, 1e6])
def test_non_finite_features_name_the_row(tmp_path, bad):
    src = make_precomp(tmp_path / "src")
    ims = np.load(src / "dev_ims.npy")
    ims[9, 2, 1] = bad  # 1e6 overflows float16
    np.save(src / "dev_ims.npy", ims)
    _expect_error(src, tmp_path, r"dev_ims.npy: dev: row 9 \(image id 9\) has NaN or infinite")


def test_caption_count_not_a_multiple(tmp_path):
    src = make_precomp(tmp_path / "src")
    with (src / "dev_caps.txt").open("a") as f:
        f.write("\none more caption")
    _expect_error(src, tmp_path, "61 captions is not a multiple of the 12 images")


def test_empty_caption_names_the_line(tmp_path):
    src = make_precomp(tmp_path / "src")
    lines = (src / "train_caps.txt").read_text().split("\n")
    lines[17] = "   "
    (src / "train_caps.txt").write_text("\n".join(lines))
    _expect_error(src, tmp_path, "train_caps.txt, line 18: empty caption")


def test_duplicate_image_id(tmp_path):
    src = make_precomp(tmp_path / "src")
    (src / "dev_ids.txt").write_text("\n".join(str(i % 11) for i in range(12)))
    _expect_error(src, tmp_path, "row 11: duplicate image id 0")


def test_truncated_npy(tmp_path):
    src = make_precomp(tmp_path / "src")
    data = (src / "train_ims.npy").read_bytes()
    (src / "train_ims.npy").write_bytes(data[: len(data) // 2])
    _expect_error(src, tmp_path, "train_ims.npy: not a readable .npy")


def test_vocab_of_the_wrong_shape(tmp_path):
    src = make_precomp(tmp_path / "src")
    (src / "f_precomp_vocab.json").write_text(json.dumps({"words": ["a", "b"]}))
    _expect_error(src, tmp_path, "f_precomp_vocab.json: expected an object with 'word2idx'")


def test_failure_mid_write_leaves_an_existing_data_set_intact(tmp_path):
    src = make_precomp(tmp_path / "src")
    convert_precomp(str(src), str(tmp_path / "out"), log=quiet)
    ims = np.load(src / "dev_ims.npy")
    ims[11] = np.nan
    np.save(src / "dev_ims.npy", ims)
    with pytest.raises(DataError, match="row 11"):
        convert_precomp(str(src), str(tmp_path / "out"), overwrite=True, chunk_rows=4, log=quiet)
    assert validate(str(tmp_path / "out"))["splits"]["dev"]["images"] == 12
