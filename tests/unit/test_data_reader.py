"""Reading (``shan.data.reader``): the example stream gives every caption once, with its own
image's features, padded with zeros; a row's num_regions is checked and a caption cut to
data.max_words wherever a split is read."""

import numpy as np
import pytest

from shan.data.format import DataError
from shan.data.reader import ExampleStream, cap_tokens, check_split, open_split, read_split
from shan.vocab import MAX_WORDS
from tests.helpers import damage_row


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


# -- bounds: num_regions checked and captions cut wherever a split is read -------------------
@pytest.fixture
def small_set(tmp_path):
    from shan.data.synthetic import generate_synthetic

    root = tmp_path / "data"
    generate_synthetic(str(root), images={"test": 4}, regions=4, feature_dim=6, concepts=6,
                       captions_per_image=2, log=lambda s: None)  # fmt: skip
    return root


def test_a_row_claiming_more_regions_than_it_has_is_named_by_every_reader(small_set):
    shard = damage_row(small_set, "test", 2, num_regions=10**9)
    message = rf"{shard}: row 2: num_regions 1000000000 not in 1\.\.4"
    with pytest.raises(DataError, match=message):
        read_split(str(small_set), "test")  # evaluation, search, the dev split in training
    with pytest.raises(DataError, match=message):
        check_split(str(small_set), "test")  # training's stream (open_split) and its driver
    with pytest.raises(DataError, match=message):
        open_split(str(small_set), "test")  # checked before Ray Data reads anything


def test_zero_regions_is_refused_too(small_set):
    damage_row(small_set, "test", 0, num_regions=0)
    with pytest.raises(DataError, match="row 0: num_regions 0 not in 1..4"):
        read_split(str(small_set), "test")


def test_a_caption_of_200000_words_is_cut_where_it_is_read(small_set):
    damage_row(small_set, "test", 1, caption_words=200_000)
    whole = read_split(str(small_set), "test")  # no limit given: the format's
    assert max(len(t) for t in whole.tokens) == MAX_WORDS + 2
    split = read_split(str(small_set), "test", max_words=80)
    long = split.tokens[2]  # row 1's first caption
    assert len(long) == 82 and long[0] == 1 and long[-1] == 2  # <start> 80 words <end>
    assert max(len(t) for t in split.tokens) == 82


def test_cap_tokens_keeps_short_captions_and_the_end_of_long_ones():
    assert cap_tokens([1, 5, 2], 3) == [1, 5, 2]
    assert cap_tokens([1, 5, 6, 7, 8, 2], 2) == [1, 5, 6, 2]
    assert len(cap_tokens([1, *[5] * 5000, 2], None)) == MAX_WORDS + 2


def test_the_training_stream_cuts_a_long_caption_before_it_waits_in_the_buffer():
    rows = [{
        "image_id": np.arange(2),
        "features": np.zeros((2, 3, 2), np.float16),
        "num_regions": np.full(2, 3),
        "tokens": np.array([[np.array([1, *[7] * 200_000, 2])], [np.array([1, 8, 2])]],
                           dtype=object),
    }]  # fmt: skip
    stream = ExampleStream(batch_size=2, buffer=0, max_words=5, drop_last=False)
    (batch,) = list(stream(rows))
    assert batch.tokens.shape == (2, 7) and sorted(batch.lengths.tolist()) == [3, 7]
