"""Tiles of the images x captions matrix: the plan, the fingerprint, the store on a local folder
(tiles scored by numpy, not by Ray actors), assembly and its checks, and the progress lines."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from shan.errors import JobError
from shan.eval.tiles import (
    PLAN_FILE,
    Plan,
    TileStore,
    assemble,
    check_complete,
    empty_matrices,
    load_finished,
    place,
    tile_problem,
)
from shan.fingerprint import digest
from shan.model import SCORES

N_IMAGES, N_CAPTIONS = 7, 11
ORDER = [3, 0, 10, 5, 1, 9, 2, 8, 4, 7, 6]  # captions by length, say


def make_plan(fp: str = "fp-1", ti: int = 3, tc: int = 4, order=None) -> Plan:
    order = ORDER if order is None else order
    return Plan(N_IMAGES, N_CAPTIONS, ti, tc, list(order), fp)


@pytest.fixture(scope="module")
def full() -> dict[str, np.ndarray]:
    """The matrices a scorer would compute: what the tiles are cut from."""
    rng = np.random.default_rng(0)
    return {k: rng.normal(size=(N_IMAGES, N_CAPTIONS)).astype(np.float32) for k in SCORES}


def score_tile(plan: Plan, full: dict, r: int, c: int) -> dict[str, np.ndarray]:
    """The fake scorer: tile (r, c) cut out of ``full`` (rows, then the plan's columns)."""
    return {k: full[k][plan.rows(r)][:, plan.cols(c)].copy() for k in SCORES}


class Log(list):
    def __call__(self, line: str) -> None:
        self.append(line)


def store_with_every_tile(tmp_path, plan: Plan, full: dict) -> TileStore:
    store = TileStore(str(tmp_path / "tiles"), plan, log=Log())
    for r, c in plan.tiles():
        store.save(r, c, score_tile(plan, full, r, c))
    return store


# -- the plan -------------------------------------------------------------------------------------
def test_plan_shape_and_tiles():
    plan = make_plan()
    assert plan.shape == (3, 3)  # ceil(7 / 3), ceil(11 / 4)
    assert plan.tiles() == [(r, c) for r in range(3) for c in range(3)]
    assert plan.tile_shape(0, 0) == (3, 4) and plan.tile_shape(2, 2) == (1, 3)


def test_plan_covers_every_cell_once():
    for ti, tc in [(3, 4), (1, 1), (7, 11), (100, 100), (2, 5)]:
        plan = make_plan(ti=ti, tc=tc)
        hits = np.zeros((N_IMAGES, N_CAPTIONS), dtype=int)
        for r, c in plan.tiles():
            hits[plan.rows(r), plan.cols(c)] += 1
            assert plan.tile_shape(r, c) == (
                plan.rows(r).stop - plan.rows(r).start,
                len(plan.cols(c)),
            )
        assert (hits == 1).all(), (ti, tc)


def test_columns_follow_the_caption_order():
    plan = make_plan()
    cols = np.concatenate([plan.cols(c) for c in range(plan.shape[1])])
    assert cols.tolist() == ORDER
    assert plan.cols(0).tolist() == [3, 0, 10, 5]
    assert plan.rows(2) == slice(6, 7)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ti": 0}, "tile sizes must be at least 1"),
        ({"tc": 0}, "tile sizes must be at least 1"),
        ({"order": ORDER[:-1]}, "permutation"),
        ({"order": [*ORDER[:-1], 3]}, "permutation"),
        ({"order": [*ORDER[:-1], 11]}, "permutation"),
    ],
)
def test_bad_plans(kw, message):
    with pytest.raises(JobError, match=message):
        make_plan(**kw)


# -- the fingerprint ------------------------------------------------------------------------------
def test_fingerprint_is_stable_and_sensitive():
    fp = digest("data", b"\x00\x01", "split", "test")
    assert fp == digest("data", b"\x00\x01", "split", "test")
    assert len(fp) == 32 and int(fp, 16) >= 0
    assert digest("a", "b") == digest(b"a", b"b")  # text is its UTF-8 bytes
    others = {
        digest("data", b"\x00\x02", "split", "test"),
        digest("data", b"\x00\x01", "split", "dev"),
        digest("split", "test", "data", b"\x00\x01"),  # order matters
        digest("data", b"\x00\x01", "split", "test", ""),  # so does an empty part
    }
    assert fp not in others and len(others) == 4


def test_fingerprint_parts_do_not_run_together():
    assert digest("ab", "c") != digest("a", "bc")
    assert digest("abc") != digest("ab", "c")


def test_fingerprint_of_the_evaluation_job_changes_with_each_input():
    """shan.eval.job.tile_fingerprint: every input it names changes it."""
    from types import SimpleNamespace

    from shan.eval.job import EvalOptions, tile_fingerprint

    split = SimpleNamespace(image_ids=np.arange(4), captions=["a"] * 20)

    def fp(files=None, device=("cpu", "float32"), **opts):
        job = SimpleNamespace(opts=EvalOptions(**opts), split=split)
        return tile_fingerprint("data-1", files or {"model.pt": b"w"}, job, device)

    base = fp()
    assert base == fp()
    changed = [
        fp(files={"model.pt": b"w2"}),
        fp(files={"model.pt": b"w", "vocab.json": b"{}"}),
        fp(device=("cuda:H100", "bf16")),
        fp(device=("cpu", "bf16")),
        fp(split="dev"),
        fp(protocol="f30k"),
        fp(tile_images=128),
        fp(tile_captions=512),
        fp(block=16),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


# -- tile_problem ---------------------------------------------------------------------------------
def test_tile_problem(full):
    plan = make_plan()
    good = score_tile(plan, full, 1, 2)
    assert tile_problem(plan, 1, 2, good) is None
    assert "not a set of matrices" in tile_problem(plan, 1, 2, [1, 2])
    assert "no 'g2g' matrix" in tile_problem(plan, 1, 2, {k: good[k] for k in SCORES[:-1]})
    other = score_tile(plan, full, 0, 0)
    assert "has shape (3, 4), expected (3, 3)" in tile_problem(plan, 1, 2, other)
    ints = {**good, "l2l": good["l2l"].astype(np.int32)}
    assert "'l2l' is not a floating-point matrix" in tile_problem(plan, 1, 2, ints)
    bad = {**good, "total": good["total"].copy()}
    bad["total"][0, 1] = np.inf
    assert "'total' holds NaN or infinite values" in tile_problem(plan, 1, 2, bad)


# -- the store ------------------------------------------------------------------------------------
def test_saved_tiles_read_back_and_assemble(tmp_path, full):
    plan = make_plan()
    store_with_every_tile(tmp_path, plan, full)
    log = Log()
    again = TileStore(str(tmp_path / "tiles"), plan, log=log)  # a rerun: same plan
    assert again.listed() == set(plan.tiles())
    assert log == []  # nothing recomputed, nothing cleared
    sims, todo = load_finished(plan, again)
    assert todo == []
    for k in SCORES:
        np.testing.assert_array_equal(sims[k], full[k])
    out = assemble(plan, again)
    for k in SCORES:
        np.testing.assert_array_equal(out[k], full[k])


def test_the_store_writes_its_plan(tmp_path):
    plan = make_plan()
    TileStore(str(tmp_path / "tiles"), plan, log=Log())
    stored = json.loads((tmp_path / "tiles" / PLAN_FILE).read_text())
    assert stored["fingerprint"] == "fp-1" and stored["caption_order"] == ORDER


def write_tile(store: TileStore, r: int, c: int, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (store_root(store) / f"tile-r{r:05d}-c{c:05d}.npz").write_bytes(buf.getvalue())


def store_root(store: TileStore) -> Path:
    return Path(store.root)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "shape", "nan", "missing key"])
def test_a_bad_stored_tile_is_recomputed_not_used(tmp_path, full, damage):
    plan = make_plan()
    store = store_with_every_tile(tmp_path, plan, full)
    path = store_root(store) / "tile-r00001-c00002.npz"
    good = score_tile(plan, full, 1, 2)
    if damage == "garbage":
        path.write_bytes(b"not an npz file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "shape":
        write_tile(store, 1, 2, score_tile(plan, full, 0, 0))
    elif damage == "nan":
        write_tile(store, 1, 2, {**good, "g2l": np.full_like(good["g2l"], np.nan)})
    else:
        write_tile(store, 1, 2, {k: good[k] for k in SCORES if k != "l2l"})
    log = Log()
    store = TileStore(store.root, plan, log=log)
    assert store.load(1, 2) is None
    assert log and str(path) in log[-1] and log[-1].endswith("recomputing it")
    sims, todo = load_finished(plan, store)
    assert todo == [(1, 2)]
    assert np.isnan(sims["total"][plan.rows(1)][:, plan.cols(2)]).all()  # never a stale value
    with pytest.raises(JobError, match=r"1 tile\(s\) missing or unusable, e.g. \(1, 2\)"):
        assemble(plan, store)
    # recomputed and saved, the tile is used again
    store.save(1, 2, good)
    assert load_finished(plan, store)[1] == []


def test_a_missing_tile(tmp_path, full):
    plan = make_plan()
    store = store_with_every_tile(tmp_path, plan, full)
    (store_root(store) / "tile-r00002-c00000.npz").unlink()
    assert (2, 0) not in store.listed() and not store.done(2, 0) and store.done(2, 1)
    assert load_finished(plan, store)[1] == [(2, 0)]
    with pytest.raises(JobError, match=r"missing or unusable, e.g. \(2, 0\)") as e:
        assemble(plan, store)
    assert store.root in str(e.value)


def test_tiles_of_another_fingerprint_are_deleted(tmp_path, full):
    old = make_plan("fp-old")
    store_with_every_tile(tmp_path, old, full)
    (tmp_path / "tiles" / "notes.txt").write_text("not ours")
    log = Log()
    store = TileStore(str(tmp_path / "tiles"), make_plan("fp-new"), log=log)
    assert store.listed() == set()
    assert len(log) == 1 and "tiles of another evaluation; recomputing them" in log[0]
    assert (tmp_path / "tiles" / "notes.txt").read_text() == "not ours"  # only its own files
    assert json.loads((tmp_path / "tiles" / PLAN_FILE).read_text())["fingerprint"] == "fp-new"


def test_tiles_of_another_tiling_are_deleted(tmp_path, full):
    store_with_every_tile(tmp_path, make_plan(ti=3, tc=4), full)
    store = TileStore(str(tmp_path / "tiles"), make_plan(ti=2, tc=4), log=Log())
    assert store.listed() == set()


@pytest.mark.parametrize(
    ("plan_bytes", "why"),
    [
        (b"{broken", "is unreadable (JSONDecodeError)"),
        (b"\xff\xfe", "is unreadable"),
        (b'{"fingerprint": "fp-1"}', "is not a tile plan"),
        (b"[1, 2]", "is not a tile plan"),
        (None, "tiles of another evaluation"),  # tiles without a plan.json
    ],
)
def test_an_unusable_plan_file_clears_the_tiles(tmp_path, full, plan_bytes, why):
    plan = make_plan()
    store_with_every_tile(tmp_path, plan, full)
    plan_path = tmp_path / "tiles" / PLAN_FILE
    if plan_bytes is None:
        plan_path.unlink()
    else:
        plan_path.write_bytes(plan_bytes)
    log = Log()
    store = TileStore(str(tmp_path / "tiles"), plan, log=log)
    assert store.listed() == set() and len(log) == 1 and why in log[0]


@pytest.mark.parametrize(
    "name", ["tile-r00000-c00000.npz.tmp-4242", ".tile-r00000-c00000.npz.tmp-k3_x9abc"]
)
def test_a_left_over_temporary_is_cleared(tmp_path, name):
    """Of a write killed mid-way: fs.write_atomic's, or an older version's name."""
    folder = tmp_path / "tiles"
    folder.mkdir()
    (folder / name).write_bytes(b"half")
    log = Log()
    TileStore(str(folder), make_plan(), log=log)
    assert not (folder / name).exists() and len(log) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["plan.json"]  # no temporary of its own


def test_a_fresh_store_says_nothing(tmp_path):
    log = Log()
    TileStore(str(tmp_path / "new"), make_plan(), log=log)
    assert log == []


def test_save_refuses_a_bad_tile_and_writes_nothing(tmp_path, full):
    plan = make_plan()
    store = TileStore(str(tmp_path / "tiles"), plan, log=Log())
    bad = score_tile(plan, full, 0, 1)
    bad["l2l"][0, 0] = np.nan
    with pytest.raises(JobError, match=r"tile \(0, 1\) is not saved: 'l2l' holds NaN"):
        store.save(0, 1, bad)
    assert store.listed() == set() and [p.name for p in store_root(store).iterdir()] == [PLAN_FILE]


def test_the_guard_runs_before_every_write(tmp_path, full):
    plan = make_plan()
    calls = []
    store = TileStore(str(tmp_path / "tiles"), plan, log=Log(), guard=lambda: calls.append(1))
    assert len(calls) == 2  # clear, then plan.json
    store.save(0, 0, score_tile(plan, full, 0, 0))
    assert len(calls) == 3

    def lost():
        raise JobError("the output lock was lost")

    store.guard = lost
    with pytest.raises(JobError, match="lock was lost"):
        store.save(0, 1, score_tile(plan, full, 0, 1))
    assert store.listed() == {(0, 0)}


# -- placing and checking -------------------------------------------------------------------------
def test_place_puts_a_tile_in_the_plan_columns(full):
    plan = make_plan()
    sims = empty_matrices(plan)
    assert all(np.isnan(sims[k]).all() and sims[k].dtype == np.float32 for k in SCORES)
    place(plan, sims, 0, 0, score_tile(plan, full, 0, 0))
    assert np.array_equal(sims["g2g"][:3, [3, 0, 10, 5]], full["g2g"][:3, [3, 0, 10, 5]])
    assert np.isnan(sims["g2g"][:3, 1]).all() and np.isnan(sims["g2g"][3:]).all()
    with pytest.raises(JobError, match=r"tile \(0, 1\): 'total' has shape"):
        place(plan, sims, 0, 1, score_tile(plan, full, 2, 2))


def test_check_complete(full):
    plan = make_plan()
    sims = empty_matrices(plan)
    for r, c in plan.tiles():
        place(plan, sims, r, c, score_tile(plan, full, r, c))
    check_complete(plan, sims)
    sims["l2l"][4, 9] = np.nan  # row 4: tile row 1; caption 9: position 5, tile column 1
    sims["l2l"][6, 6] = np.inf  # row 6: tile row 2; caption 6: position 10, tile column 2
    with pytest.raises(JobError) as e:
        check_complete(plan, sims, "the averaged matrix")
    text = str(e.value)
    assert text.startswith("the averaged matrix is incomplete: 2 l2l scores")
    assert "tiles [(1, 1), (2, 2)]" in text and "no metrics were written" in text


def test_check_complete_lists_five_tiles_at_most():
    plan = make_plan(ti=1, tc=1)
    with pytest.raises(JobError, match=r"77 total scores .*\(tiles \[.*\] \.\.\.\)"):
        check_complete(plan, empty_matrices(plan))


def test_check_complete_refuses_a_missing_or_misshapen_matrix(full):
    plan = make_plan()
    with pytest.raises(JobError, match=r"\(g2g\) has shape None"):
        check_complete(plan, {k: full[k] for k in SCORES[:-1]})
    with pytest.raises(JobError, match=r"\(total\) has shape \(7, 10\), expected \(7, 11\)"):
        check_complete(plan, {k: full[k][:, :10] for k in SCORES})
