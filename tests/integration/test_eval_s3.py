"""The evaluation's safety nets on S3 (the session's real S3 endpoint, moto's server): the lock
object (refused, taken over when stale, removed), a corrupt tile plan, and a model downloaded
from S3 to a folder that is always removed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from shan.data import fs
from shan.errors import CheckpointError, JobError
from shan.eval import tiles
from shan.eval.job import EvalOptions
from shan.eval.lock import LOCK_NAME, OutLock
from shan.model import SCORES
from shan.tracking import refs
from tests.helpers import save_untrained


def plan(fp: str = "fp-a", n_images: int = 5, n_captions: int = 7) -> tiles.Plan:
    order = list(reversed(range(n_captions)))  # columns are a permutation of the captions
    return tiles.Plan(n_images, n_captions, 2, 3, order, fp)


def fake_tile(p: tiles.Plan, r: int, c: int) -> dict[str, np.ndarray]:
    """What a scorer would give: cell (i, j) of score k is 100 k + 10 i + j (row, caption)."""
    rows = np.arange(p.rows(r).start, p.rows(r).stop)[:, None]
    cols = p.cols(c)[None, :]
    return {k: (100 * n + 10 * rows + cols).astype(np.float32) for n, k in enumerate(SCORES)}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A freshly initialised tiny checkpoint (no data set needed)."""
    from shan.vocab import Vocabulary

    return save_untrained(tmp_path_factory.mktemp("ck") / "ck", Vocabulary(["a", "dog", "cat"]))


def _lock_info(out: str) -> dict:
    """The lock object's contents, from one GET (it may be rewritten meanwhile)."""
    import s3fs

    from shan.eval.lock import _get

    bucket, _, key = fs.join(out, LOCK_NAME)[len("s3://") :].partition("/")
    return json.loads(_get(s3fs.S3FileSystem(), bucket, key)[0])


def test_s3_lock_refuses_takes_over_when_stale_and_is_removed(s3_root):
    out = f"{s3_root}/lock-{time.time_ns()}"
    first = OutLock(out, heartbeat_s=0.2).acquire()
    try:
        with pytest.raises(JobError, match="being written by another evaluation"):
            OutLock(out).acquire()
        beat = _lock_info(out)["heartbeat"]
        time.sleep(0.8)
        assert _lock_info(out)["heartbeat"] > beat  # the heartbeat thread renews it
        first._stop.set()  # first freezes: no heartbeat any more
        first._thread.join()
        time.sleep(0.6)
        with pytest.raises(JobError, match="being written"):
            OutLock(out, stale_s=30).acquire()  # not stale yet for a patient taker
        lines = []
        second = OutLock(out, stale_s=0.5, log=lines.append).acquire()
        assert "took over a stale lock" in lines[0]
        assert _lock_info(out)["token"] == second.token
        assert not first.beat()  # first wakes up: its lock is gone, it stops writing
        with pytest.raises(JobError, match="took the lock over"):
            first.check()
    finally:
        first.release()
    assert _lock_info(out)["token"] == second.token  # first did not remove second's lock
    second.release()
    assert not fs.exists(fs.join(out, LOCK_NAME))


def test_s3_tile_store_replaces_a_corrupt_plan(s3_root):
    root = f"{s3_root}/store-{time.time_ns()}"
    p = plan()
    store = tiles.TileStore(root, p, log=lambda s: None)
    for r, c in p.tiles():
        store.save(r, c, fake_tile(p, r, c))
    assert tiles.load_finished(p, store)[1] == []
    fs.write_bytes(fs.join(root, "plan.json"), b"{trunc")
    assert tiles.TileStore(root, p, log=lambda s: None).listed() == set()


def test_an_s3_model_is_downloaded_to_a_folder_that_is_removed(s3_root, tiny_checkpoint, tmp_path):
    import tempfile

    from shan.data.synthetic import generate_synthetic
    from shan.eval.job import evaluate

    url = f"{s3_root}/model-{time.time_ns()}"
    for f in tiny_checkpoint.iterdir():
        fs.write_bytes(f"{url}/{f.name}", f.read_bytes())
    got = refs.resolve(url)
    assert (
        got.temp
        and (Path(got.temp) / "model.pt").read_bytes()
        == (tiny_checkpoint / "model.pt").read_bytes()
    )
    refs.cleanup([got])
    assert not Path(got.path).exists()
    # and evaluate() removes it whatever happens: here the model does not fit the data
    data = tmp_path / "data"
    generate_synthetic(str(data), images={"test": 4}, regions=4, feature_dim=16, log=lambda s: None)
    before = set(Path(tempfile.gettempdir()).glob("shan-model-*"))
    with pytest.raises(CheckpointError, match="vocabulary"):
        evaluate([url], str(data), str(tmp_path / "out"), EvalOptions(), log=lambda s: None)
    assert set(Path(tempfile.gettempdir()).glob("shan-model-*")) <= before
    assert not (tmp_path / "out").exists()
