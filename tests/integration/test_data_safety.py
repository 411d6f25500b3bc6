"""Writers never delete or overwrite what they did not write; an interrupted or failed write
never spoils the data set it replaces nor looks complete: ``shan data precomp`` run through
its ``main`` in the test process, or as a subprocess that is SIGKILLed mid-write
(``tests/integration/killed_conversion.py``). Local cases need nothing else; ``s3://`` cases
use the suite's S3 endpoint (moto's server on 127.0.0.1)."""

from __future__ import annotations

import json
import secrets
from pathlib import Path

import numpy as np
import pytest

from shan.data import destination, fs
from shan.data.format import DataError, load_card
from shan.data.validate import validate
from tests.cli import assert_user_error, run_main, run_module, snapshot
from tests.helpers import make_precomp


def convert(src: Path, out: str, *extra: str, killed_after: int | None = None):
    """``shan data precomp`` through its ``main``; with ``killed_after``, a subprocess that is
    SIGKILLed after that many chunks (``tests/integration/killed_conversion.py``)."""
    args = ("precomp", str(src), "--out", out, "--chunk-rows", "4", *extra)
    if killed_after is None:
        return run_main("prepare_data", *args)
    return run_module("tests.integration.killed_conversion", str(killed_after), *args)


def two_sources(tmp: Path) -> tuple[Path, Path]:
    """Two precomp folders of the same shape with different content; the second's dev split
    has a NaN in its last chunk, so a conversion of it fails after the train split is written."""
    a = make_precomp(tmp / "a", seed=1)
    b = make_precomp(tmp / "b", seed=2)
    bad = make_precomp(tmp / "bad", seed=3)
    ims = np.load(bad / "dev_ims.npy")
    ims[-1, 0, 0] = np.nan
    np.save(bad / "dev_ims.npy", ims)
    return a, b


# -- local ------------------------------------------------------------------------------------
def test_overwrite_swaps_in_the_new_data_set_and_removes_only_the_old_ones_files(tmp_path):
    a, b = two_sources(tmp_path)
    out = tmp_path / "out"
    assert convert(a, str(out)).returncode == 0
    old = load_card(str(out))
    r = convert(b, str(out), "--overwrite", "--rows-per-file", "5")
    assert r.returncode == 0, r.stderr
    new = validate(str(out))
    assert new["digest"] != old.digest
    assert sorted(fs.list_files(str(out))) == sorted(["dataset.json", *load_card(str(out)).files()])
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_a_killed_overwrite_leaves_the_previous_data_set_valid(tmp_path):
    a, b = two_sources(tmp_path)
    out = tmp_path / "out"
    assert convert(a, str(out)).returncode == 0
    before, summary = snapshot(out), validate(str(out))
    r = convert(b, str(out), "--overwrite", killed_after=2)
    assert r.returncode == -9, r.stderr  # SIGKILL mid-write
    assert snapshot(out) == before and validate(str(out)) == summary
    stages = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(stages) == 1 and list(stages[0].rglob("*.parquet"))  # it was mid-write
    with pytest.raises(DataError):
        validate(str(stages[0]))  # nothing there passes as a data set
    r = convert(b, str(out), "--overwrite")  # the next write clears the dead one's folder
    assert r.returncode == 0, r.stderr
    assert "staging folder of an interrupted write" in r.stdout
    assert not stages[0].exists() and validate(str(out))["digest"] != summary["digest"]


def test_a_killed_first_write_leaves_nothing_at_out(tmp_path):
    a, _ = two_sources(tmp_path)
    r = convert(a, str(tmp_path / "out"), killed_after=1)
    assert r.returncode == -9
    assert not (tmp_path / "out").exists()
    with pytest.raises(DataError, match="does not exist"):
        validate(str(tmp_path / "out"))


def test_a_failed_overwrite_keeps_the_previous_data_set(tmp_path):
    a, _ = two_sources(tmp_path)
    out = tmp_path / "out"
    assert convert(a, str(out)).returncode == 0
    before = snapshot(out)
    r = convert(tmp_path / "bad", str(out), "--overwrite")
    assert_user_error(r, "dev_ims.npy", "NaN")
    assert snapshot(out) == before
    assert [p for p in tmp_path.iterdir() if ".partial-" in p.name] == []


def test_an_empty_folder_is_a_fine_destination(tmp_path):
    a, _ = two_sources(tmp_path)
    (tmp_path / "out" / "empty-sub").mkdir(parents=True)
    assert convert(a, str(tmp_path / "out")).returncode == 0
    validate(str(tmp_path / "out"))


def test_a_staging_folder_of_a_live_writer_or_of_someone_else_is_left_alone(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / ".out.partial-live"
    live.mkdir()
    (live / destination.MARKER).write_text(json.dumps({"host": "x", "pid": 1}))
    other = tmp_path / ".out.partial-other"
    other.mkdir()
    (other / "mine.txt").write_text("not ours")
    a, _ = two_sources(tmp_path)
    assert convert(a, str(out)).returncode == 0
    assert live.exists() and (other / "mine.txt").read_text() == "not ours"


# -- s3:// ------------------------------------------------------------------------------------
def put(uri: str, data: bytes) -> None:
    fs.write_bytes(uri, data)


def keys(prefix: str) -> set[str]:
    return set(fs.list_files(prefix))


@pytest.fixture
def prefix(services):
    return f"s3://shan/safety-{secrets.token_hex(4)}"


def test_s3_prefix_with_other_objects_is_refused_and_left_alone(prefix, tmp_path):
    put(f"{prefix}/report.pdf", b"%PDF someone's report")
    r = run_main("prepare_data", "synthetic", "--out", prefix, "--train", "8", "--dev", "4")
    assert_user_error(r, prefix, "report.pdf")
    assert keys(prefix) == {"report.pdf"}
    assert fs.read_bytes(f"{prefix}/report.pdf") == b"%PDF someone's report"


def test_s3_overwrite_keeps_foreign_objects_and_removes_only_the_old_cards_files(prefix, tmp_path):
    a, b = two_sources(tmp_path)
    assert convert(a, prefix).returncode == 0
    old = load_card(prefix)
    put(f"{prefix}/notes.txt", b"mine")  # added after, by someone else
    r = convert(b, prefix, "--overwrite")
    assert r.returncode == 0, r.stderr
    new = load_card(prefix)
    assert keys(prefix) == {"dataset.json", "notes.txt", *new.files()}
    assert not set(old.files()) & keys(prefix)
    assert fs.read_bytes(f"{prefix}/notes.txt") == b"mine"
    assert validate(prefix)["digest"] == new.digest != old.digest


def test_s3_failed_overwrite_deletes_only_its_own_keys_and_the_old_data_set_stays_valid(
    prefix, tmp_path
):
    a, _ = two_sources(tmp_path)
    assert convert(a, prefix).returncode == 0
    put(f"{prefix}/notes.txt", b"mine")
    before, summary = keys(prefix), validate(prefix)
    r = convert(tmp_path / "bad", prefix, "--overwrite")
    assert_user_error(r, "dev_ims.npy", "NaN")
    assert keys(prefix) == before and validate(prefix) == summary
    assert fs.read_bytes(f"{prefix}/notes.txt") == b"mine"


def test_s3_killed_overwrite_leaves_the_old_data_set_valid_and_says_so_next_time(prefix, tmp_path):
    a, b = two_sources(tmp_path)
    assert convert(a, prefix).returncode == 0
    summary = validate(prefix)
    r = convert(b, prefix, "--overwrite", "--rows-per-file", "4", killed_after=2)
    assert r.returncode == -9
    assert validate(prefix) == summary  # still the old one, complete
    left = {k.split("/")[0] for k in keys(prefix)} - {"dataset.json"}
    assert len(left) == 2  # the old generation and the killed one's
    r = convert(b, prefix, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert "files of an interrupted write" in r.stdout
    assert validate(prefix)["digest"] != summary["digest"]
