"""Validating a data set (``shan.data.validate``): damaged or foreign shards, a missing column
or card, a file whose bytes differ from the card's checksum, a caption over the format's
limit and a row's num_regions beyond its features are named."""

import pytest

from shan.data.format import DataError, load_card
from shan.data.precomp import convert_precomp
from shan.data.reader import read_split
from shan.data.validate import validate
from shan.vocab import MAX_WORDS
from tests.helpers import damage_row, make_precomp, quiet


@pytest.fixture
def converted(tmp_path):
    out = tmp_path / "out"
    convert_precomp(str(make_precomp(tmp_path / "src")), str(out), log=quiet)
    return out


def test_truncated_and_foreign_parquet_files_are_named(converted):
    out = converted
    part = out / "dev" / "part-00000.parquet"
    part.write_bytes(part.read_bytes()[:-100])
    with pytest.raises(DataError, match="dev/part-00000.parquet: not a readable Parquet"):
        validate(str(out))
    with pytest.raises(DataError, match="dev/part-00000.parquet"):
        read_split(str(out), "dev")
    part.write_text("image_id,features\n1,2\n")
    with pytest.raises(DataError, match="dev/part-00000.parquet"):
        validate(str(out))


def test_missing_column_and_missing_card(converted, tmp_path):
    import pyarrow.parquet as pq

    out = converted
    part = out / "train" / "part-00000.parquet"
    pq.write_table(pq.read_table(part).drop_columns(["tokens"]), part)
    with pytest.raises(DataError, match="missing column 'tokens'"):
        validate(str(out))
    (out / "dataset.json").unlink()
    with pytest.raises(DataError, match="not a complete data set"):
        validate(str(out))
    with pytest.raises(DataError, match="does not exist"):
        validate(str(tmp_path / "nowhere"))


def test_the_card_checksums_catch_a_changed_file(converted):
    out = converted
    card = load_card(str(out))
    assert set(card.checksums) == set(card.files()) and len(card.digest) == 64
    vocab = out / card.vocab
    vocab.write_text(vocab.read_text().replace("}", " }", 1))  # same words, other bytes
    with pytest.raises(DataError, match="vocab.json: its content differs"):
        validate(str(out))


def test_a_caption_over_the_formats_limit_is_named(converted):
    shard = damage_row(converted, "train", 3, caption_words=200_000)
    with pytest.raises(DataError, match=rf"{shard}: row 3: caption 0 has 200,000 words, more "
                       rf"than the format's {MAX_WORDS:,}"):  # fmt: skip
        validate(str(converted))


def test_a_caption_at_the_limit_is_valid(converted):
    damage_row(converted, "train", 3, caption_words=MAX_WORDS)
    with pytest.raises(DataError, match="checksum"):  # the rows pass; the bytes changed
        validate(str(converted))


def test_a_row_over_its_regions_is_named(converted):
    shard = damage_row(converted, "dev", 1, num_regions=10**9)
    with pytest.raises(DataError, match=rf"{shard}: row 1: num_regions 1000000000 not in 1..4"):
        validate(str(converted))
