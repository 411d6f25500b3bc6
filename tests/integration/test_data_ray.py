"""The reading side through a real Ray instance, and a real S3 endpoint (moto's server)."""

import numpy as np
import pytest

from shan.data.format import DataError
from shan.data.fs import StorageError
from shan.data.precomp import convert_precomp
from shan.data.reader import ExampleStream, open_split, read_split
from shan.data.synthetic import generate_synthetic
from shan.data.validate import validate
from tests.helpers import make_precomp, quiet

SMALL = dict(images={"train": 40, "dev": 10}, regions=5, feature_dim=8, concepts=10,
             rows_per_file=15, log=quiet)  # fmt: skip


def stream_all(root, split, batch_size=7):
    ds = open_split(root, split)
    stream = ExampleStream(batch_size=batch_size, buffer=20, seed=0, drop_last=False)
    return list(stream(ds.iter_batches(batch_size=5, batch_format="numpy")))


def test_precomp_to_ray_data_every_caption_once(tmp_path, ray_client):
    src = make_precomp(tmp_path / "src", splits=("train",), n=23, per=5, k=4, f=6)
    convert_precomp(str(src), str(tmp_path / "out"), rows_per_file=10, chunk_rows=6, log=quiet)
    ims = np.load(src / "train_ims.npy")
    lines = (src / "train_caps.txt").read_text().split("\n")
    data = read_split(str(tmp_path / "out"), "train")
    expected = sorted((i, tuple(data.tokens[5 * i + j])) for i in range(23) for j in range(5))
    seen = []
    for batch in stream_all(str(tmp_path / "out"), "train"):
        for j in range(len(batch)):
            iid = int(batch.image_ids[j])
            seen.append((iid, tuple(batch.tokens[j, : batch.lengths[j]].tolist())))
            np.testing.assert_allclose(
                batch.features[j].float().numpy(), ims[iid], rtol=1e-3, atol=1e-3
            )
    assert sorted(seen) == expected
    assert len(lines) == len(seen) == 115


def test_s3_round_trip(s3_root, ray_client, tmp_path):
    root = f"{s3_root}/synthetic"
    generate_synthetic(root, **SMALL)
    summary = validate(root)
    assert summary["splits"]["train"]["images"] == 40
    local = tmp_path / "local"
    generate_synthetic(str(local), **SMALL)
    a, b = read_split(root, "dev"), read_split(str(local), "dev")
    assert a.captions == b.captions
    np.testing.assert_array_equal(a.features, b.features)
    n = sum(len(batch) for batch in stream_all(root, "train"))
    assert n == 200


def test_unreachable_bucket_is_one_clear_error(services):
    with pytest.raises(StorageError, match="s3://no-such-bucket/x.*bucket no-such-bucket"):
        generate_synthetic("s3://no-such-bucket/x", images={"train": 5}, log=quiet)
    with pytest.raises(DataError, match="no-such-bucket"):
        validate("s3://no-such-bucket/x")
