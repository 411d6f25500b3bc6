"""The index build job (``shan.indexing``) in this process (``local``: no Ray): the index holds
the split's images as the model encodes them; a second build of the same key does nothing; a
model without a first stage, a bad option and a foreign destination are refused before any
work. The Ray Data path is tested in tests/integration/test_index.py."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from shan.checkpoint import load_model
from shan.data.reader import read_split
from shan.errors import CheckpointError, ConfigError, JobError
from shan.fingerprint import file_digests
from shan.index import open_index
from shan.indexing import IndexOptions, build_index
from shan.scoring import image_vectors
from tests.helpers import first_stage_config, save_untrained


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from shan.data.format import load_vocab
    from shan.data.synthetic import generate_synthetic

    tmp = tmp_path_factory.mktemp("indexing")
    data = tmp / "data"
    generate_synthetic(str(data), images={"test": 11}, regions=4, feature_dim=16, concepts=10,
                       log=lambda s: None)  # fmt: skip
    vocab = load_vocab(str(data))
    return {
        "data": str(data),
        "ckpt": str(save_untrained(tmp / "ckpt", vocab, first_stage_config(tmp))),
        "plain": str(save_untrained(tmp / "plain", vocab)),
    }


def _build(base, out, **kw):
    opts = IndexOptions(**{"local": True, "batch_size": 4, "shard_size": 5, **kw})
    lines: list[str] = []
    result = build_index(base["ckpt"], base["data"], "test", str(out), opts, log=lines.append)
    return result, lines


def test_the_index_holds_the_models_encodings(base, tmp_path):
    result, _ = _build(base, tmp_path / "idx")
    assert result.built and result.card.images == 11 and len(result.card.shards) == 3
    loaded = load_model(base["ckpt"])
    split = read_split(base["data"], "test")
    index = open_index(str(tmp_path / "idx"), model_files=file_digests(base["ckpt"]),
                       data_fingerprint=result.card.data_fingerprint, name="m")  # fmt: skip
    assert index.image_ids.tolist() == split.image_ids.tolist()
    want = image_vectors(loaded.model, split.features, split.num_regions, torch.device("cpu"))
    rows, sims = index.search(want, 1)
    assert rows[:, 0].tolist() == list(range(11))
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)
    with torch.no_grad():
        enc = loaded.model.encode_images(
            torch.from_numpy(split.features.astype(np.float32)), torch.tensor(split.num_regions)
        )
    got = index.images(loaded.model, np.arange(11))
    for f in ("v", "mask", "vp", "vg", "pv"):
        torch.testing.assert_close(getattr(got, f), getattr(enc, f))


def test_a_second_build_of_the_same_key_does_nothing(base, tmp_path):
    first, _ = _build(base, tmp_path / "idx")
    stamp = os.stat(tmp_path / "idx" / "index.json").st_mtime_ns
    again, lines = _build(base, tmp_path / "idx")
    assert not again.built and "nothing to do" in lines[-1]
    assert os.stat(tmp_path / "idx" / "index.json").st_mtime_ns == stamp
    rebuilt, _ = _build(base, tmp_path / "idx", overwrite=True, kind="hnsw")
    assert rebuilt.built and rebuilt.card.kind == "hnsw"


def test_refusals_come_before_any_work(base, tmp_path):
    with pytest.raises(CheckpointError, match="has no first-stage head"):
        build_index(base["plain"], base["data"], "test", str(tmp_path / "a"),
                    IndexOptions(local=True), log=lambda s: None)  # fmt: skip
    with pytest.raises(ConfigError) as e:
        _build(base, tmp_path / "b", kind="pq", batch_size=0)
    assert len(e.value.problems) == 2
    with pytest.raises(JobError, match="has no split 'dev'"):
        build_index(base["ckpt"], base["data"], "dev", str(tmp_path / "c"),
                    IndexOptions(local=True), log=lambda s: None)  # fmt: skip
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("x")
    with pytest.raises(JobError, match=r"already holds files \(mine.txt\)"):
        _build(base, tmp_path / "d")
    assert sorted(os.listdir(tmp_path)) == ["d"]  # nothing else written
