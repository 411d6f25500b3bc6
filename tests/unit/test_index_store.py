"""The index folder (``shan.index.store``, ``shan.index.reader``): written through a staging
folder with the card last, sharded, never over what the project did not write; opened only for
the model and data it was built from, each refusal one line; fragments read by row."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from shan.errors import JobError
from shan.index import CARD, IndexWriter, open_index
from shan.index.card import IndexCard
from tests.helpers import tiny_model

MODEL = {"model.pt": "a" * 64, "config.yaml": "b" * 64}
OTHER = {"model.pt": "e" * 64, "config.yaml": "b" * 64}
K, D_REG, DIM = 4, 16, 8


def _rows(n, seed=0):
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(n, DIM)).astype(np.float32)
    vec /= np.linalg.norm(vec, axis=1, keepdims=True)
    v = rng.normal(size=(n, K, D_REG)).astype(np.float32)
    counts = rng.integers(1, K + 1, n)
    return np.arange(n) + 1000, vec, v, counts


def _build(dest, n=10, *, shard_size=4, batches=3, **kw):
    ids, vec, v, counts = _rows(n)
    with IndexWriter(str(dest), shard_size=shard_size, log=lambda s: None, **kw) as w:
        for part in np.array_split(np.arange(n), batches):
            w.add(ids[part], vec[part], v[part], counts[part])
        card = w.commit(model="run:abc", model_files=MODEL, data="d", data_fingerprint="fp",
                        split="test")  # fmt: skip
    return card, (ids, vec, v, counts)


def _open(dest, **kw):
    args = dict(model_files=MODEL, data_fingerprint="fp", name="mine")
    return open_index(str(dest), **{**args, **kw})


def test_sharded_rows_read_back_by_row(tmp_path):
    dest = tmp_path / "idx"
    card, (ids, vec, v, counts) = _build(dest, n=10, shard_size=4)
    assert [s.images for s in card.shards] == [4, 4, 2]
    assert sorted(os.listdir(tmp_path)) == ["idx"]  # no staging folder left
    index = _open(dest)
    assert len(index) == 10 and index.image_ids.tolist() == ids.tolist()
    rows = np.array([9, 0, 5, 4, 5])  # across shards, unordered, repeated
    got_v, got_counts = index.fragments(rows)
    np.testing.assert_array_equal(got_v, v[rows])
    np.testing.assert_array_equal(got_counts, counts[rows])
    found, sims = index.search(vec[[3, 7]], 2)
    assert found[:, 0].tolist() == [3, 7] and np.allclose(sims[:, 0], 1, atol=1e-5)


def test_images_are_the_scorers_terms_of_the_stored_rows(tmp_path):
    model = tiny_model(d=D_REG).float()
    _build(tmp_path / "idx", n=6, shard_size=4)
    index = _open(tmp_path / "idx")
    rows = np.array([5, 1])
    v, counts = index.fragments(rows)
    mask = torch.arange(K)[None, :] < torch.from_numpy(counts)[:, None]
    want = model.image_terms(torch.from_numpy(v), mask)
    got = index.images(model, rows)
    for f in ("v", "mask", "vp", "vg", "pv"):
        assert torch.equal(getattr(got, f), getattr(want, f))


def test_an_index_of_another_model_is_refused_naming_it(tmp_path):
    _build(tmp_path / "idx")
    with pytest.raises(JobError) as e:
        _open(tmp_path / "idx", model_files=OTHER)
    msg = str(e.value)
    assert "\n" not in msg and "built from model run:abc" in msg and "not from model mine" in msg


def test_an_index_of_other_data_or_split_is_refused(tmp_path):
    _build(tmp_path / "idx")
    with pytest.raises(JobError, match="another data set"):
        _open(tmp_path / "idx", data_fingerprint="other")
    with pytest.raises(JobError, match="holds split 'test'"):
        _open(tmp_path / "idx", split="dev")
    assert len(_open(tmp_path / "idx", data_fingerprint=None)) == 10  # not checked


def test_missing_and_foreign_indexes_are_refused(tmp_path):
    with pytest.raises(JobError, match="does not exist"):
        _open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(JobError, match="holds no index"):
        _open(tmp_path / "empty")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(JobError, match=r"not an index: it has no index.json \(it holds notes"):
        _open(tmp_path / "other")
    (tmp_path / "other" / CARD).write_text(json.dumps({"format": "something/2"}))
    with pytest.raises(JobError, match="is not a shan-index/1 index card"):
        _open(tmp_path / "other")


def test_a_truncated_fragment_file_is_refused(tmp_path):
    card, _ = _build(tmp_path / "idx")
    path = tmp_path / "idx" / card.shards[1].fragments
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(JobError, match=r"fragments-00001.npy has \d+ bytes, its card says"):
        _open(tmp_path / "idx")
    path.unlink()
    with pytest.raises(JobError, match="fragments-00001.npy is missing"):
        _open(tmp_path / "idx")


def test_a_failed_write_leaves_nothing_complete_looking(tmp_path):
    ids, vec, v, counts = _rows(10)
    writer = IndexWriter(str(tmp_path / "idx"), shard_size=4, log=lambda s: None)
    with pytest.raises(RuntimeError, match="encoder died"), writer as w:
        w.add(ids, vec, v, counts)  # two shards written in the staging folder
        assert len(list(tmp_path.glob(".idx.partial-*/fragments-*.npy"))) == 2
        raise RuntimeError("encoder died")
    assert os.listdir(tmp_path) == []  # no staging folder, no index folder


def test_never_overwrites_what_it_did_not_write(tmp_path):
    dest = tmp_path / "idx"
    dest.mkdir()
    (dest / "keep.txt").write_text("theirs")
    with pytest.raises(JobError, match=r"already holds files \(keep.txt\); nothing was written"):
        _build(dest)
    assert os.listdir(dest) == ["keep.txt"] and sorted(os.listdir(tmp_path)) == ["idx"]
    (dest / "keep.txt").unlink()
    _build(dest)  # an empty folder is fine
    with pytest.raises(JobError, match="already holds an index .*pass --overwrite"):
        _build(dest)
    card, _ = _build(dest, n=6, overwrite=True)
    assert _open(dest).card.images == 6 == card.images
    assert sorted(os.listdir(dest)) == sorted([CARD, *card.files()])  # old shards removed
    (dest / "extra.bin").write_bytes(b"x")
    with pytest.raises(JobError, match="not part of its index"):
        _build(dest, overwrite=True)


def test_card_round_trip_and_damage(tmp_path):
    card, _ = _build(tmp_path / "idx")
    again = IndexCard.from_json(card.to_json(), "x")
    assert again == card and again.digest == card.digest
    broken = json.loads(card.to_json())
    broken["images"] = 11
    with pytest.raises(JobError, match="damaged index card"):
        IndexCard.from_json(json.dumps(broken), "x")
