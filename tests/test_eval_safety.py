"""The evaluation's safety nets, unit by unit: the tile plan and store (with a fake scorer),
the fingerprint, the output folder check, the lock, S3 keys of downloaded models, checkpoint
loading. The S3 ones run against the session's real S3 endpoint (moto's server)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from shan.data import fs
from shan.errors import CheckpointError, JobError
from shan.eval import outputs, refs, tiles
from shan.eval.job import EvalOptions, check_options, data_fingerprint, tile_fingerprint
from shan.eval.lock import LOCK_NAME, OutLock

ROOT = Path(__file__).resolve().parent.parent


def plan(fp: str = "fp-a", n_images: int = 5, n_captions: int = 7) -> tiles.Plan:
    order = list(reversed(range(n_captions)))  # columns are a permutation of the captions
    return tiles.Plan(n_images, n_captions, 2, 3, order, fp)


def fake_tile(p: tiles.Plan, r: int, c: int) -> dict[str, np.ndarray]:
    """What a scorer would give: cell (i, j) of score k is 100 k + 10 i + j (row, caption)."""
    rows = np.arange(p.rows(r).start, p.rows(r).stop)[:, None]
    cols = p.cols(c)[None, :]
    return {k: (100 * n + 10 * rows + cols).astype(np.float32) for n, k in enumerate(tiles.SCORES)}


def expected(p: tiles.Plan) -> dict[str, np.ndarray]:
    i, j = np.arange(p.n_images)[:, None], np.arange(p.n_captions)[None, :]
    return {k: (100 * n + 10 * i + j).astype(np.float32) for n, k in enumerate(tiles.SCORES)}


def filled_store(root: Path, p: tiles.Plan, log=None) -> tiles.TileStore:
    store = tiles.TileStore(str(root), p, log=log or (lambda s: None))
    for r, c in p.tiles():
        store.save(r, c, fake_tile(p, r, c))
    return store


def tile_file(root: Path, r: int, c: int) -> Path:
    return root / f"tile-r{r:05d}-c{c:05d}.npz"


# -- plan and store --------------------------------------------------------------------------------
def test_plan_refuses_tile_sizes_below_one():
    for ti, tc in ((0, 3), (-1, 3), (2, 0)):
        with pytest.raises(JobError, match="tile sizes must be at least 1"):
            tiles.Plan(5, 7, ti, tc, list(range(7)), "fp")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(tile_images=-1), "tile_images"),
        (dict(tile_captions=0), "tile_captions"),
        (dict(actors=0), "actors"),
        (dict(cpus_per_actor=0.0), "cpus_per_actor"),
        (dict(gpus_per_actor=1.5), "gpus_per_actor"),
        (dict(protocol="coco-2k"), "unknown protocol"),
    ],
)
def test_library_options_are_range_checked(change, message):
    with pytest.raises(JobError, match=message):
        check_options(EvalOptions(**change))


def test_matrices_start_as_nan_and_a_missing_tile_is_found(tmp_path):
    p = plan()
    assert all(np.isnan(m).all() for m in tiles.empty_matrices(p).values())
    store = filled_store(tmp_path, p)
    tile_file(tmp_path, 1, 2).unlink()
    sims, todo = tiles.load_finished(p, store)
    assert todo == [(1, 2)]
    assert np.isnan(sims["total"][p.rows(1)][:, p.cols(2)]).all()
    with pytest.raises(JobError, match=r"incomplete.*\(1, 2\)"):
        tiles.check_complete(p, sims)
    with pytest.raises(JobError, match="missing or unusable"):
        tiles.assemble(p, store)


def test_a_complete_store_gives_every_cell_in_caption_order(tmp_path):
    p = plan()
    store = filled_store(tmp_path, p)
    sims, todo = tiles.load_finished(p, store)
    assert todo == []
    tiles.check_complete(p, sims)
    for k, v in expected(p).items():
        np.testing.assert_array_equal(sims[k], v)
    # reopening with the same plan keeps the tiles
    again = tiles.TileStore(str(tmp_path), p, log=lambda s: None)
    assert again.listed() == set(p.tiles())


def _savez(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _bad_tiles(p: tiles.Plan) -> dict[str, bytes]:
    good = fake_tile(p, 0, 1)
    nan = {k: v.copy() for k, v in good.items()}
    nan["g2l"][0, 0] = np.nan
    inf = {k: v.copy() for k, v in good.items()}
    inf["total"][1, 2] = np.inf
    whole = _savez(**good)
    return {
        "truncated": whole[: len(whole) // 2],
        "empty": b"",
        "not a zip": b"hello, not an npz file",
        "nan": _savez(**nan),
        "inf": _savez(**inf),
        "wrong shape": _savez(**{k: v[:1] for k, v in good.items()}),
        "missing key": _savez(**{k: v for k, v in good.items() if k != "l2l"}),
        "integers": _savez(**{k: v.astype(np.int64) for k, v in good.items()}),
        "objects": _savez(**{k: np.array([[object()]]) for k in good}),
    }


@pytest.mark.parametrize("kind", list(_bad_tiles(plan())))
def test_a_bad_stored_tile_is_recomputed_not_used(tmp_path, kind):
    p = plan()
    lines = []
    store = filled_store(tmp_path, p, log=lines.append)
    tile_file(tmp_path, 0, 1).write_bytes(_bad_tiles(p)[kind])
    sims, todo = tiles.load_finished(p, store)
    assert todo == [(0, 1)]
    assert np.isnan(sims["total"][p.rows(0)][:, p.cols(1)]).all()
    assert any("tile-r00000-c00001.npz" in line and "recomputing" in line for line in lines)


def test_a_bad_tile_is_never_saved(tmp_path):
    p = plan()
    store = tiles.TileStore(str(tmp_path), p, log=lambda s: None)
    nan = fake_tile(p, 0, 0)
    nan["total"][0, 0] = np.nan
    with pytest.raises(JobError, match="NaN"):
        store.save(0, 0, nan)
    with pytest.raises(JobError, match="shape"):
        store.save(0, 0, fake_tile(p, 0, 2))  # the last column of tiles is narrower
    assert store.listed() == set()


@pytest.mark.parametrize(
    "content",
    [b'{"n_images": 5, "n_cap', b"not json at all", b'{"wrong": "keys"}', b"[1, 2]", b"\xff\xfe"],
    ids=["truncated", "not-json", "wrong-keys", "a-list", "not-utf8"],
)
def test_a_corrupt_plan_replaces_the_tiles(tmp_path, content):
    p = plan()
    filled_store(tmp_path, p)
    (tmp_path / "plan.json").write_bytes(content)
    (tmp_path / "notes.txt").write_text("not ours")
    lines = []
    store = tiles.TileStore(str(tmp_path), p, log=lines.append)
    assert store.listed() == set()  # every old tile deleted
    assert json.loads((tmp_path / "plan.json").read_text()) == asdict(p)
    assert (tmp_path / "notes.txt").read_text() == "not ours"  # only our own files are deleted
    assert lines and "recomputing" in lines[0]


def test_tiles_of_another_fingerprint_or_without_a_plan_are_replaced(tmp_path):
    filled_store(tmp_path, plan("old"))
    (tmp_path / "tile-r00000-c00000.npz.tmp-123").write_bytes(b"half")
    (tmp_path / "plan.json.tmp-124").write_bytes(b"half")
    store = tiles.TileStore(str(tmp_path), plan("new"), log=lambda s: None)
    assert store.listed() == set()
    assert not (tmp_path / "tile-r00000-c00000.npz.tmp-123").exists()
    assert not (tmp_path / "plan.json.tmp-124").exists()
    filled_store(tmp_path, plan("new"))
    (tmp_path / "plan.json").unlink()  # tiles of unknown provenance
    assert tiles.TileStore(str(tmp_path), plan("new"), log=lambda s: None).listed() == set()


def test_the_store_guard_stops_writes(tmp_path):
    def lost():
        raise JobError("lock lost")

    p = plan()
    store = tiles.TileStore(str(tmp_path), p, log=lambda s: None)
    store.guard = lost
    with pytest.raises(JobError, match="lock lost"):
        store.save(0, 0, fake_tile(p, 0, 0))
    assert store.listed() == set()


# -- fingerprint -----------------------------------------------------------------------------------
class _Split:
    def __init__(self, seed: int = 0, n: int = 3):
        rng = np.random.default_rng(seed)
        self.image_ids = np.arange(n, dtype=np.int64)
        self.features = rng.normal(size=(n, 4, 5)).astype(np.float16)
        self.num_regions = np.full(n, 4, dtype=np.int32)
        self.caption_image = np.repeat(np.arange(n), 2)
        self.tokens = [[1, 5 + i, 2] for i in range(2 * n)]
        self.captions = ["c"] * (2 * n)


def test_the_data_fingerprint_covers_the_card_and_the_content():
    card = b'{"name": "x", "created": "2026-01-01T00:00:00Z"}'
    base = data_fingerprint(card, _Split())
    assert data_fingerprint(card, _Split()) == base
    assert data_fingerprint(card.replace(b"01T", b"02T"), _Split()) != base
    assert data_fingerprint(card, _Split(seed=1)) != base
    tokens = _Split()
    tokens.tokens[0] = [1, 9, 2]
    assert data_fingerprint(card, tokens) != base


def test_the_tile_fingerprint_covers_model_precision_device_and_sizes():
    files = {"model.pt": b"weights", "config.yaml": b"cfg", "vocab.json": b"vocab"}
    o, s = EvalOptions(), _Split()
    base = tile_fingerprint("data", files, o, s, "cpu", "float32")
    assert tile_fingerprint("data", dict(files), o, s, "cpu", "float32") == base
    changed = [
        tile_fingerprint("data2", files, o, s, "cpu", "float32"),
        tile_fingerprint("data", {**files, "model.pt": b"weights2"}, o, s, "cpu", "float32"),
        tile_fingerprint("data", {**files, "config.yaml": b"cfg2"}, o, s, "cpu", "float32"),
        tile_fingerprint("data", {**files, "vocab.json": b"vocab2"}, o, s, "cpu", "float32"),
        tile_fingerprint("data", files, o, s, "cuda:NVIDIA H100", "float32"),
        tile_fingerprint("data", files, o, s, "cuda:NVIDIA H100", "bf16"),
        tile_fingerprint("data", files, replace(o, split="dev"), s, "cpu", "float32"),
        tile_fingerprint("data", files, replace(o, protocol="f30k"), s, "cpu", "float32"),
        tile_fingerprint("data", files, replace(o, tile_images=7), s, "cpu", "float32"),
        tile_fingerprint("data", files, replace(o, tile_captions=7), s, "cpu", "float32"),
        tile_fingerprint("data", files, replace(o, block=8), s, "cpu", "float32"),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_fingerprint_parts_do_not_run_together():
    assert tiles.fingerprint("ab", "c") != tiles.fingerprint("a", "bc")


# -- the output folder -----------------------------------------------------------------------------
def test_a_rerun_leaves_no_attention_picture_of_the_earlier_run(tmp_path):
    for i in range(4):
        (tmp_path / f"attention_{i}.png").write_bytes(b"old")
    for name in ("metrics.json", "recall.md", "sims_total.npy"):
        (tmp_path / name).write_bytes(b"x")
    outputs.mark_incomplete(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recall.md", "sims_total.npy"]


def test_only_an_evaluations_own_files_are_accepted_in_out(tmp_path):
    ours = [
        "sims_total.npy",
        "sims_g2g.npy",
        "index.json",
        "metrics.json",
        "recall.md",
        "recall_at_k.png",
        "attention_0.png",
        "attention_12.png",
        "promotion.json",
        LOCK_NAME,
        "tiles/model-0/plan.json",
        "tiles/model-1/tile-r00001-c00002.npz",
        "tiles/model-1/tile-r00001-c00002.npz.tmp-77",
        "tiles/model-1/plan.json.tmp-78",
        "v3/metrics.json",
        "v3/tiles/model-0/plan.json",
    ]
    for name in ours:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert outputs.foreign_entries(str(tmp_path)) == []
    outputs.check_out(str(tmp_path))
    for name in ("notes.txt", "tiles/model-0/mine.npz", "v3/x/y.txt", "sims_other.npy"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "empty").mkdir()
    assert outputs.foreign_entries(str(tmp_path)) == [
        "empty/",
        "notes.txt",
        "sims_other.npy",
        "tiles/model-0/mine.npz",
        "v3/x/",
    ]
    with pytest.raises(JobError, match=r"empty/, notes.txt, sims_other.npy and 2 more"):
        outputs.check_out(str(tmp_path))
    assert outputs.foreign_entries(str(tmp_path / "missing")) == []
    with pytest.raises(JobError, match="is a file"):
        outputs.check_out(str(tmp_path / "notes.txt"))


def test_outputs_with_a_nan_matrix_are_not_written(tmp_path):
    sims = {k: np.zeros((2, 3), np.float32) for k in tiles.SCORES}
    sims["g2g"][1, 1] = np.nan
    with pytest.raises(JobError, match="g2g matrix holds NaN"):
        outputs.write_outputs(str(tmp_path), sims, {}, {}, {}, "")
    assert list(tmp_path.iterdir()) == []


# -- the lock, local -------------------------------------------------------------------------------
def test_a_local_out_is_locked_while_an_evaluation_writes(tmp_path):
    out = str(tmp_path / "out")
    with OutLock(out):
        with pytest.raises(JobError, match=rf"being written by another evaluation.*{LOCK_NAME}"):
            OutLock(out).acquire()
        info = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert info["pid"] == os.getpid()
    with OutLock(out):  # released
        pass


def test_a_local_lock_is_released_when_its_process_dies(tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys, time; sys.path.insert(0, sys.argv[2]); from shan.eval.lock import OutLock;"
        "l = OutLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out), str(ROOT)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(JobError, match=f"pid {proc.pid}"):
            OutLock(str(out)).acquire()
    finally:
        proc.kill()
        proc.wait()
    with OutLock(str(out)):
        pass


# -- models from S3: keys, temporary folders ---------------------------------------------
@pytest.mark.parametrize(
    "key", ["b/ck/../../x", "b/ck/a/../../../x", "b/ck/./x", "b/ck//etc/x", "b/other/x"]
)
def test_s3_keys_outside_the_download_folder_are_refused(key):
    with pytest.raises(CheckpointError, match="key"):
        refs.safe_relative(key, "b/ck")


def test_s3_keys_inside_are_kept():
    assert refs.safe_relative("b/ck/model.pt", "b/ck") == "model.pt"
    assert refs.safe_relative("b/ck/sub/x..y", "b/ck/") == "sub/x..y"


def test_cleanup_removes_download_folders_only(tmp_path):
    temp, kept = tmp_path / "temp", tmp_path / "kept"
    temp.mkdir()
    kept.mkdir()
    models = [refs.ModelRef("s3://x", str(temp), temp=str(temp)), refs.ModelRef("c", str(kept))]
    refs.cleanup(models)
    assert not temp.exists() and kept.exists()


# -- checkpoints -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A freshly initialised tiny checkpoint (no data set needed)."""
    import warnings

    import torch

    from shan.checkpoint import save_checkpoint
    from shan.config import load_config
    from shan.model import SHAN
    from shan.vocab import Vocabulary

    cfg = load_config(str(ROOT / "tests" / "configs" / "tiny.yaml"))
    vocab = Vocabulary(["a", "dog", "cat"])
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SHAN(cfg.model, len(vocab))
    return save_checkpoint(tmp_path_factory.mktemp("ck") / "ck", model, cfg, vocab, step=0)


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _crafted_pickle() -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    return pickle.dumps(Evil())


def _zip_not_torch() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("hello.txt", "not a torch file")
    return buf.getvalue()


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("model.pt", lambda: _crafted_pickle(), "cannot be loaded"),
        ("model.pt", lambda: _zip_not_torch(), "cannot be loaded"),
        ("model.pt", lambda: os.urandom(4096), "cannot be loaded"),
        ("model.pt", lambda: b"", "cannot be loaded"),
        ("model.pt", lambda: _torch_bytes({"weights": {}}), "without 'model'"),
        ("model.pt", lambda: _torch_bytes([1, 2]), "not a SHAN checkpoint"),
        ("config.yaml", lambda: b"\xff\xfe\x00bad", "not UTF-8"),
        ("config.yaml", lambda: b"model: [unclosed", "not valid YAML"),
        ("config.yaml", lambda: b"- a list\n", "not a valid config"),
        ("vocab.json", lambda: b'{"word2idx": {"\xff": 0}}', "not UTF-8"),
        ("vocab.json", lambda: b"{not json", "not valid json"),
    ],
    ids=[
        "pickle-refused",
        "zip-not-torch",
        "random-bytes",
        "empty",
        "no-model-key",
        "not-a-dict",
        "config-not-utf8",
        "config-not-yaml",
        "config-not-mapping",
        "vocab-not-utf8",
        "vocab-not-json",
    ],
)
def test_a_damaged_or_crafted_checkpoint_is_one_clear_error(
    tiny_checkpoint, tmp_path, name, content, message
):
    from shan.checkpoint import load_model

    ck = _copy(tiny_checkpoint, tmp_path / "ck")
    (ck / name).write_bytes(content())
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(ck)
    assert name in str(e.value) and "\n" not in str(e.value)


def test_weights_that_do_not_fit_or_are_not_finite_are_refused(tiny_checkpoint, tmp_path):
    import torch

    from shan.checkpoint import load_model

    payload = torch.load(tiny_checkpoint / "model.pt", weights_only=True)
    first = next(iter(payload["model"]))
    ck = _copy(tiny_checkpoint, tmp_path / "nan")
    bad = {k: v.clone() for k, v in payload["model"].items()}
    bad[first].view(-1)[0] = float("nan")
    torch.save({"model": bad}, ck / "model.pt")
    with pytest.raises(CheckpointError, match=f"{first}.*NaN or infinite"):
        load_model(ck)
    ck = _copy(tiny_checkpoint, tmp_path / "missing")
    torch.save(
        {"model": {k: v for k, v in payload["model"].items() if k != first}}, ck / "model.pt"
    )
    with pytest.raises(CheckpointError, match="do not match config.yaml"):
        load_model(ck)
    load_model(tiny_checkpoint)  # the original loads


# -- S3 (the session's real S3 endpoint) ---------------------------------------------------------
def _lock_info(out: str) -> dict:
    """The lock object's contents, from one GET (it may be rewritten meanwhile)."""
    import s3fs

    from shan.eval.lock import _get

    bucket, _, key = fs.join(out, LOCK_NAME)[len("s3://") :].partition("/")
    return json.loads(_get(s3fs.S3FileSystem(), bucket, key)[0])


@pytest.mark.integration
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


@pytest.mark.integration
def test_s3_tile_store_replaces_a_corrupt_plan(s3_root):
    root = f"{s3_root}/store-{time.time_ns()}"
    p = plan()
    store = tiles.TileStore(root, p, log=lambda s: None)
    for r, c in p.tiles():
        store.save(r, c, fake_tile(p, r, c))
    assert tiles.load_finished(p, store)[1] == []
    fs.write_bytes(fs.join(root, "plan.json"), b"{trunc")
    assert tiles.TileStore(root, p, log=lambda s: None).listed() == set()


@pytest.mark.integration
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
    generate_synthetic(str(data), {"test": 4}, regions=4, feature_dim=16, log=lambda s: None)
    before = set(Path(tempfile.gettempdir()).glob("shan-model-*"))
    with pytest.raises(CheckpointError, match="vocabulary"):
        evaluate([url], str(data), str(tmp_path / "out"), EvalOptions(), log=lambda s: None)
    assert set(Path(tempfile.gettempdir()).glob("shan-model-*")) <= before
    assert not (tmp_path / "out").exists()
