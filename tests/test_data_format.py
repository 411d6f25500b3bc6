"""Converter, generator, validation and their errors (no Ray, no services)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shan.data.format import DataError, load_card
from shan.data.precomp import convert_precomp
from shan.data.reader import ExampleStream, read_split
from shan.data.synthetic import generate_synthetic
from shan.data.validate import validate
from shan.vocab import VocabError, Vocabulary
from tests.helpers import make_precomp

ROOT = Path(__file__).resolve().parent.parent


def quiet(_):
    pass


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
    assert validate(str(tmp_path / "out"))["splits"]["dev"]["captions"] == 60


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


def test_truncated_and_foreign_parquet_files_are_named(tmp_path):
    src = make_precomp(tmp_path / "src")
    out = tmp_path / "out"
    convert_precomp(str(src), str(out), log=quiet)
    part = out / "dev" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(DataError, match="dev/part-00000.parquet: not a readable Parquet"):
        validate(str(out))
    with pytest.raises(DataError, match="dev/part-00000.parquet"):
        read_split(str(out), "dev")
    part.write_text("image_id,features\n1,2\n")
    with pytest.raises(DataError, match="dev/part-00000.parquet"):
        validate(str(out))


def test_missing_column_and_missing_card(tmp_path):
    import pyarrow.parquet as pq

    src = make_precomp(tmp_path / "src")
    out = tmp_path / "out"
    convert_precomp(str(src), str(out), log=quiet)
    part = out / "train" / "part-00000.parquet"
    pq.write_table(pq.read_table(part).drop_columns(["tokens"]), part)
    with pytest.raises(DataError, match="missing column 'tokens'"):
        validate(str(out))
    (out / "dataset.json").unlink()
    with pytest.raises(DataError, match="not a complete data set"):
        validate(str(out))
    with pytest.raises(DataError, match="does not exist"):
        validate(str(tmp_path / "nowhere"))


def test_cli_errors_exit_non_zero_with_one_line(tmp_path):
    src = make_precomp(tmp_path / "src")
    (src / "dev_caps.txt").unlink()
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "jobs/prepare_data.py"),
            "precomp",
            str(src),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: caption file")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_synthetic_is_reproducible_and_valid(tmp_path):
    kw = dict(images={"train": 30, "test": 20}, regions=5, feature_dim=8, concepts=12, log=quiet)
    generate_synthetic(str(tmp_path / "a"), seed=3, **kw)
    generate_synthetic(str(tmp_path / "b"), seed=3, chunk_rows=7, **kw)
    a, b = read_split(str(tmp_path / "a"), "test"), read_split(str(tmp_path / "b"), "test")
    assert a.captions == b.captions
    np.testing.assert_array_equal(a.features, b.features)
    assert a.boxes.shape == (20, 5, 4)
    assert validate(str(tmp_path / "a"))["splits"]["train"]["captions"] == 150
    # captions name concepts that are in the image: words repeat across an image's captions
    c = read_split(str(tmp_path / "a"), "train")
    assert c.captions[0] != c.captions[5]


def test_example_stream_gives_each_caption_once():
    rng = np.random.default_rng(0)
    rows = []
    for b in range(3):
        n = 4
        rows.append(
            {
                "image_id": np.arange(b * n, b * n + n),
                "features": rng.normal(size=(n, 3, 2)).astype(np.float16),
                "num_regions": np.full(n, 3),
                "tokens": np.array(
                    [
                        [np.array([1, 10 + i, 2]), np.array([1, 10 + i, 20 + i, 2])]
                        for i in range(b * n, b * n + n)
                    ],
                    dtype=object,
                ),
            }
        )
    feats = np.concatenate([r["features"] for r in rows])
    stream = ExampleStream(batch_size=5, buffer=6, seed=1, drop_last=False)
    seen = []
    for batch in stream(rows):
        assert batch.tokens.shape[0] == batch.lengths.shape[0] == batch.features.shape[0]
        for j in range(len(batch)):
            iid = int(batch.image_ids[j])
            toks = batch.tokens[j, : batch.lengths[j]].tolist()
            assert toks[1] == 10 + iid  # the caption belongs to its image
            assert (batch.tokens[j, batch.lengths[j] :] == 0).all()
            np.testing.assert_array_equal(batch.features[j].numpy(), feats[iid])
            seen.append((iid, len(toks)))
    assert sorted(seen) == sorted((i, n) for i in range(12) for n in (3, 4))
