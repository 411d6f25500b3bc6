"""The search's image index (``shan.search.index``): built once and reused from its cache
file, keyed by the model, the data and the split; written atomically; a foreign file at its name
is refused and left as it is."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shan.errors import JobError
from shan.fingerprint import index_key
from shan.search.index import cache_path, image_index
from tests.helpers import tiny_model

FILES = {"model.pt": "a" * 64, "config.yaml": "b" * 64, "vocab.json": "c" * 64}


def _split(seed: int = 0, n: int = 5):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4, 12)).astype(np.float16), np.full(n, 4), np.arange(n) + 100


def test_the_key_covers_model_data_and_split():
    base = index_key(FILES, "data", "test")
    assert index_key(dict(reversed(FILES.items())), "data", "test") == base
    assert index_key({**FILES, "model.pt": "d" * 64}, "data", "test") != base
    assert index_key(FILES, "data2", "test") != base
    assert index_key(FILES, "data", "dev") != base


def test_the_index_is_built_once_and_reused(tmp_path, monkeypatch):
    model = tiny_model().float()
    feats, counts, ids = _split()
    key = index_key(FILES, "data", "test")
    index, built = image_index(
        model, feats, counts, ids, key=key, cache_dir=str(tmp_path), log=print
    )
    assert built and len(index) == 5 and index.image_ids.tolist() == list(range(100, 105))
    assert [p.name for p in tmp_path.iterdir()] == [f"index-{key}.pt"]  # no temporary left

    def no_encoding(*a, **k):
        raise AssertionError("the image encoder ran with a warm cache")

    monkeypatch.setattr(model, "encode_images", no_encoding)
    again, built = image_index(
        model, feats, counts, ids, key=key, cache_dir=str(tmp_path), log=print
    )
    assert not built
    for f in ("v", "mask", "vp", "vg", "pv"):
        assert torch.equal(getattr(again.images, f), getattr(index.images, f))
    monkeypatch.undo()
    # other data (another key): encoded again, the first file kept
    feats2, _, _ = _split(seed=1)
    key2 = index_key(FILES, "data2", "test")
    other, built = image_index(
        model, feats2, counts, ids, key=key2, cache_dir=str(tmp_path), log=print
    )
    assert built and not torch.equal(other.images.v, index.images.v)
    assert len(list(tmp_path.iterdir())) == 2


def test_a_foreign_or_damaged_file_is_refused_and_kept(tmp_path):
    model = tiny_model().float()
    feats, counts, ids = _split()
    key = index_key(FILES, "data", "test")
    path = cache_path(tmp_path, key)
    path.write_bytes(b"not an index")
    with pytest.raises(JobError, match=rf"{path} is not the search index .*left alone"):
        image_index(model, feats, counts, ids, key=key, cache_dir=str(tmp_path), log=print)
    assert path.read_bytes() == b"not an index"
    torch.save({"format": "shan-search-index/1", "key": "other"}, path)  # renamed by hand
    with pytest.raises(JobError, match="another format or key"):
        image_index(model, feats, counts, ids, key=key, cache_dir=str(tmp_path), log=print)
    (tmp_path / "file").write_text("x")
    with pytest.raises(JobError, match="is a file, not a folder"):
        image_index(model, feats, counts, ids, key=key, cache_dir=str(tmp_path / "file"), log=print)
