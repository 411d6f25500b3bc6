"""``shan index build`` on the tests' Ray head: a small synthetic split encoded by Ray Data
actors into an index, local (through the real command line) and on the S3 endpoint; each opens
for its model and data and holds the split's images in row order, as the model encodes them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shan.checkpoint import load_model
from shan.data import fs
from shan.data.format import CARD, load_vocab
from shan.data.reader import read_split
from shan.errors import JobError
from shan.fingerprint import data_fingerprint, file_digests
from shan.index import CARD as INDEX_CARD
from shan.index import open_index
from shan.indexing import IndexOptions, build_index
from shan.scoring import image_vectors
from tests.cli import driver_lines, run_job
from tests.helpers import first_stage_config, save_untrained, untrained_with_first_stage

N = 30


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return untrained_with_first_stage(tmp_path_factory.mktemp("index"), N)


def _open(base, dest, tmp_path, model=None):
    model = model or base["ckpt"]
    data = str(base["data"])
    fp = data_fingerprint(fs.read_bytes(fs.join(data, CARD)), read_split(data, "test"))
    return open_index(dest, model_files=file_digests(model), data_fingerprint=fp,
                      name=str(model), cache=tmp_path / "cache")  # fmt: skip


def _check_contents(base, index):
    loaded = load_model(base["ckpt"])
    split = read_split(str(base["data"]), "test")
    assert index.image_ids.tolist() == split.image_ids.tolist()
    want = image_vectors(loaded.model, split.features, split.num_regions, torch.device("cpu"))
    rows, sims = index.search(want, 1)
    assert rows[:, 0].tolist() == list(range(N))  # each image finds itself: rows in order
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-4)
    with torch.no_grad():
        enc = loaded.model.encode_images(torch.from_numpy(split.features.astype(np.float32)),
                                         torch.tensor(split.num_regions))  # fmt: skip
    rows = np.array([29, 3, 17, 0])
    got = index.images(loaded.model, rows)
    torch.testing.assert_close(got.v, enc.v[rows], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.vg, enc.vg[rows], rtol=1e-4, atol=1e-5)
    assert torch.equal(got.mask, enc.mask[rows])


def test_index_build_on_ray_local_folder(base, tmp_path, ray_client):
    dest = tmp_path / "idx"
    r = run_job("index", "build", "--model", str(base["ckpt"]), "--data", str(base["data"]),
                "--split", "test", "--out", str(dest), "--batch-size", "8", "--shard-size", "12",
                "--cpus-per-actor", "0.5", timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    own = [line for line in driver_lines(r.stderr) if line.strip()]
    assert len(own) <= 15, "\n".join(own)  # the job's lines, no wall of Ray's
    assert "encode images: 100% (30/30 images)" in r.stderr
    assert f"index {dest} (built): 30 images, flat, D 8" in r.stdout
    index = _open(base, str(dest), tmp_path)
    assert [s.images for s in index.card.shards] == [12, 12, 6]
    _check_contents(base, index)
    # built from another model: refused, naming the model that built it
    with pytest.raises(JobError, match=f"built from model {base['ckpt']}, not from model"):
        _open(base, str(dest), tmp_path, model=base["plain"])
    again = run_job("index", "build", "--model", str(base["ckpt"]), "--data", str(base["data"]),
                    "--out", str(dest), "--local", timeout=120)  # fmt: skip
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr[-2000:]


def test_index_build_on_ray_to_s3(base, tmp_path, s3_root, ray_client):
    dest = f"{s3_root}/index-{tmp_path.name}"
    opts = IndexOptions(kind="ivf", batch_size=8, shard_size=16, cpus_per_actor=0.5)
    result = build_index(str(base["ckpt"]), str(base["data"]), "test", dest, opts,
                         log=lambda s: None)  # fmt: skip
    assert result.built and result.card.kind == "ivf" and result.card.params["nprobe"] >= 1
    files = fs.list_files(dest)
    assert INDEX_CARD in files and all(f == INDEX_CARD or f.startswith("gen-") for f in files)
    index = _open(base, dest, tmp_path)
    assert str(index.root).startswith(str(tmp_path / "cache"))  # downloaded once, memory-mapped
    _check_contents(base, index)
    vocab = load_vocab(str(base["data"]))
    other = save_untrained(tmp_path / "other", vocab, first_stage_config(tmp_path), seed=1)
    with pytest.raises(JobError, match="already holds an index .*pass --overwrite"):
        build_index(str(other), str(base["data"]), "test", dest, IndexOptions(local=True),
                    log=lambda s: None)  # fmt: skip
    assert fs.list_files(dest) == files  # nothing written
