"""Reading (``shan.data.reader``): the example stream gives every caption once, with its own
image's features, padded with zeros."""

import numpy as np

from shan.data.reader import ExampleStream


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
