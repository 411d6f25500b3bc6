"""The data set format (``shan.data.format``): the card's JSON round trip and its checks, the
split name rule, the row checks shared by the writer and the validator, and where files are.
Each error names the file (or split, or chunk) and the field or row that is wrong."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from shan.data.format import (
    CARD,
    DataError,
    DatasetCard,
    SplitInfo,
    check_rows,
    check_split_name,
    image_uri,
    load_card,
    split_files,
)

SRC = "somewhere/dataset.json"


def make_card(**kw) -> DatasetCard:
    base = dict(
        name="demo",
        regions=3,
        feature_dim=4,
        dtype="float32",
        has_boxes=True,
        vocab_size=9,
        max_words=20,
        splits={
            "train": SplitInfo(4, 8, ["train/part-00000.parquet", "train/part-00001.parquet"]),
            "dev": SplitInfo(2, 4, ["dev/part-00000.parquet"]),
        },
        source="unit test",
        checksums={"vocab.json": "a" * 64, "dev/part-00000.parquet": "b" * 64},
        digest="c" * 64,
        reports=["bad_images.json"],
    )
    base.update(kw)
    return DatasetCard(**base)


def card_text(**changes) -> str:
    """A valid card's JSON with top-level ``changes`` (a value of ``...`` drops the key)."""
    data = json.loads(make_card().to_json())
    for k, v in changes.items():
        if v is ...:
            data.pop(k)
        else:
            data[k] = v
    return json.dumps(data)


# -- the card ---------------------------------------------------------------------------------
def test_a_card_survives_its_json_round_trip():
    card = make_card(has_images=True, image_root="s3://bucket/images", variable_regions=True)
    again = DatasetCard.from_json(card.to_json(), SRC)
    assert again == card
    assert isinstance(again.splits["dev"], SplitInfo) and again.splits["dev"].captions == 4
    # bytes as read from storage are taken too
    assert DatasetCard.from_json(card.to_json().encode(), SRC) == card
    assert card.files() == [
        "vocab.json",
        "train/part-00000.parquet",
        "train/part-00001.parquet",
        "dev/part-00000.parquet",
        "bad_images.json",
    ]


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not a valid dataset card"),
        ("[1, 2]", "not a valid dataset card"),
        ("null", "not a valid dataset card"),
        (card_text(splits=...), "not a valid dataset card"),
        (card_text(splits=[]), "not a valid dataset card"),
        (card_text(surprise=1), "not a valid dataset card.*surprise"),
        (card_text(format="shan-parquet/0"), "format 'shan-parquet/0' is not 'shan-parquet/1'"),
        (card_text(splits={}), "the card lists no split"),
        (card_text(regions="3"), "regions must be a positive integer, got '3'"),
        (card_text(regions=True), "regions must be a positive integer, got True"),
        (card_text(feature_dim=0), "feature_dim must be a positive integer, got 0"),
        (card_text(dtype="float64"), "dtype 'float64' is not one of float16, float32"),
        (card_text(dtype=["float16"]), r"dtype \['float16'\] is not one of"),
        (card_text(checksums={"vocab.json": 5}), "checksums must map file names to sha256"),
        (card_text(checksums=["vocab.json"]), "checksums must map file names to sha256"),
        (card_text(has_images=True, image_root=""), "has_images is true but image_root is empty"),
        (card_text(reports="bad_images.json"), "reports must be a list of files"),
        (card_text(vocab=7), "file name 7 is not a path"),
        (card_text(vocab=""), "file name '' is not a path"),
        (card_text(vocab="../vocab.json"), r"file '../vocab.json' leaves the data set"),
        (card_text(reports=["/etc/passwd"]), "file '/etc/passwd' leaves the data set"),
        (card_text(reports=["a/../../b"]), "leaves the data set"),
        (card_text(reports=["..\\evil"]), "leaves the data set"),
        (card_text(reports=["C:evil"]), "leaves the data set"),
        (card_text(reports=["s3://other/x"]), "leaves the data set"),
        (card_text(checksums={"../x": "a"}), "file '../x' leaves the data set"),
        (card_text(reports=[CARD]), "the card lists itself"),
    ],
)
def test_a_bad_card_is_one_error_naming_the_file_and_field(text, match):
    with pytest.raises(DataError, match=match) as e:
        DatasetCard.from_json(text, SRC)
    assert str(e.value).startswith(SRC + ": ")


@pytest.mark.parametrize(
    "split, match",
    [
        ({"images": 1, "captions": 1, "files": []}, "split 'dev' lists no file"),
        ({"images": 1, "captions": 1, "files": "dev/a.parquet"}, "split 'dev' lists no file"),
        ({"images": -1, "captions": 1, "files": ["a"]}, "split 'dev': images -1 is not a count"),
        ({"images": 1, "captions": 2.5, "files": ["a"]}, "split 'dev': captions 2.5 is not a"),
        ({"images": 1, "captions": False, "files": ["a"]}, "captions False is not a count"),
        ({"images": 1, "captions": 1, "files": ["../a"]}, "file '../a' leaves the data set"),
        ({"images": 1, "captions": 1}, "not a valid dataset card"),
        ({"images": 1, "captions": 1, "files": ["a"], "x": 1}, "not a valid dataset card"),
    ],
)
def test_a_bad_split_entry_is_named(split, match):
    data = json.loads(make_card().to_json())
    data["splits"]["dev"] = split
    with pytest.raises(DataError, match=match):
        DatasetCard.from_json(json.dumps(data), SRC)


def test_a_card_that_is_not_utf8_says_so():
    with pytest.raises(DataError, match=f"{SRC}: not UTF-8 text"):
        DatasetCard.from_json(b'{"name": "\xff\xfe"}', SRC)


def test_load_card_tells_a_missing_data_set_from_an_incomplete_one(tmp_path):
    nowhere = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match=re.escape(f"data set {nowhere} does not exist")):
        load_card(nowhere)
    (tmp_path / "half").mkdir()
    with pytest.raises(DataError, match="half is not a complete data set.*no card"):
        load_card(str(tmp_path / "half"))
    (tmp_path / "half" / CARD).write_text(card_text(regions=-2))
    with pytest.raises(DataError, match=r"half/dataset.json: regions must be a positive integer"):
        load_card(str(tmp_path / "half"))
    card = make_card()
    (tmp_path / "half" / CARD).write_text(card.to_json())
    assert load_card(str(tmp_path / "half")) == card


# -- names and paths ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["train", "dev", "test-2", "val_1k", "a.b"])
def test_plain_split_names_pass(name):
    check_split_name(name, "here")


@pytest.mark.parametrize("name", ["", "../x", "a/b", "/abs", ".hidden", "-flag", "a..b", 3, None])
def test_a_split_name_that_could_be_a_path_is_refused_naming_where(name):
    with pytest.raises(DataError, match=r"^captions.csv: split name must be"):
        check_split_name(name, "captions.csv")


def test_split_files_are_under_the_root_and_an_unknown_split_is_named(tmp_path):
    card = make_card()
    assert split_files(str(tmp_path), card, "train") == [
        str(tmp_path / "train" / "part-00000.parquet"),
        str(tmp_path / "train" / "part-00001.parquet"),
    ]
    assert split_files("s3://bkt/data/", card, "dev") == ["s3://bkt/data/dev/part-00000.parquet"]
    with pytest.raises(DataError, match=r"has no split 'test'; it has train, dev"):
        split_files(str(tmp_path), card, "test")


def test_image_uri_joins_the_image_root(tmp_path):
    local = make_card(has_images=True, image_root=str(tmp_path / "imgs"))
    assert image_uri(local, "a/b.jpg") == str(tmp_path / "imgs" / "a" / "b.jpg")
    remote = make_card(has_images=True, image_root="s3://bkt/imgs/")
    assert image_uri(remote, "a/b.jpg") == "s3://bkt/imgs/a/b.jpg"


# -- rows -----------------------------------------------------------------------------------------
def rows(n=4, k=3, f=2):
    """(image ids, features, num_regions, captions) of ``n`` good rows."""
    ids = np.arange(100, 100 + n)
    feats = np.ones((n, k, f), np.float32)
    regions = np.full(n, k, np.int32)
    captions = [[f"caption {i}", f"another {i}"] for i in range(n)]
    return ids, feats, regions, captions


def test_good_rows_pass_and_their_ids_are_remembered():
    ids, feats, regions, caps = rows()
    seen: set[int] = set()
    check_rows("w", 0, ids, feats, regions, captions=caps, seen_ids=seen)
    assert seen == {100, 101, 102, 103}
    # the next chunk may not repeat an id of this one: named with its row in the split
    with pytest.raises(DataError, match=r"^w: row 7: duplicate image id 103$"):
        check_rows("w", 4, np.array([104, 105, 106, 103]), feats, regions, captions=caps,
                   seen_ids=seen)  # fmt: skip


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_name_the_row_and_image(bad):
    ids, feats, regions, caps = rows()
    feats[2, 1, 0] = bad
    with pytest.raises(DataError, match=r"^dev: row 12 \(image id 102\) has NaN or infinite"):
        check_rows("dev", 10, ids, feats, regions, captions=caps, seen_ids=set())


@pytest.mark.parametrize("count", [0, -1, 4])
def test_region_counts_outside_one_to_k_name_the_row(count):
    ids, feats, regions, caps = rows(k=3)
    regions[1] = count
    with pytest.raises(DataError, match=rf"^dev: row 6: num_regions {count} not in 1\.\.3$"):
        check_rows("dev", 5, ids, feats, regions, captions=caps, seen_ids=set())


def test_a_row_without_captions_or_with_an_empty_one_is_named():
    ids, feats, regions, caps = rows()
    caps[3] = []
    with pytest.raises(DataError, match=r"^t: row 3 \(image id 103\) has no caption$"):
        check_rows("t", 0, ids, feats, regions, captions=caps, seen_ids=set())
    for empty in ("", "   \t", None):
        ids, feats, regions, caps = rows()
        caps[1] = ["fine", empty]
        with pytest.raises(DataError, match=r"^t: row 1 \(image id 101\): caption 1 is empty$"):
            check_rows("t", 0, ids, feats, regions, captions=caps, seen_ids=set())


def test_a_repeated_id_within_one_chunk_is_named_at_its_second_row():
    ids, feats, regions, caps = rows()
    ids[3] = ids[1]
    with pytest.raises(DataError, match=r"row 3: duplicate image id 101"):
        check_rows("t", 0, ids, feats, regions, captions=caps, seen_ids=set())
