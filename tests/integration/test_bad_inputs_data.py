"""Bad inputs of ``jobs/prepare_data.py``, through the real command line: exit 2, one line
naming the file, option or value, no traceback, the user's files untouched and nothing that
looks like a finished data set left behind. The cases run through the job's ``main`` in the
test process, two as subprocesses of ``jobs/prepare_data.py``."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from tests.cli import Case, assert_user_error, last_line, run_case, run_main, snapshot
from tests.helpers import damage_row, make_precomp, mounted_tmpfs

SYN = ["--train", "8", "--dev", "4", "--test", "0", "--regions", "4", "--feature-dim", "6"]


def user_folder(tmp: Path) -> Path:
    """A folder of someone's own files."""
    d = tmp / "mine"
    (d / "notes").mkdir(parents=True)
    (d / "thesis.tex").write_text("\\section{years of work}")
    (d / "notes" / "todo.txt").write_text("back this up")
    return d


def synthetic_into(tmp: Path, *extra: str) -> list[str]:
    return ["synthetic", "--out", str(tmp / "mine"), *SYN, *extra]


def existing_data_set(tmp: Path) -> Path:
    from shan.data.synthetic import generate_synthetic

    out = tmp / "mine"
    generate_synthetic(str(out), images={"train": 8}, regions=4, feature_dim=6, log=lambda s: None)
    return out


def dataset_with_extra_file(tmp: Path) -> list[str]:
    out = existing_data_set(tmp)
    (out / "README.txt").write_text("my notes on this data set")
    return synthetic_into(tmp, "--overwrite")


def cwd_args(tmp: Path) -> list[str]:
    user_folder(tmp)
    return ["synthetic", "--out", ".", *SYN]


def precomp(tmp: Path, *extra: str, out: str | None = None) -> list[str]:
    src = tmp / "src" if (tmp / "src").exists() else make_precomp(tmp / "src")
    return ["precomp", str(src), "--out", out or str(tmp / "out"), *extra]


def with_file(name: str, data: bytes | np.ndarray | None):
    """A precomp source with ``name`` replaced by ``data`` (bytes, or an array to np.save)."""

    def argv(tmp: Path) -> list[str]:
        src = make_precomp(tmp / "src")
        if isinstance(data, np.ndarray):
            np.save(src / name, data, allow_pickle=True)
        else:
            (src / name).write_bytes(data)
        return precomp(tmp)

    return argv


def boxes(train: np.ndarray):
    """Good dev boxes, ``train`` as the train boxes."""

    def argv(tmp: Path) -> list[str]:
        args = with_file("train_boxes.npy", train)(tmp)
        np.save(tmp / "src" / "dev_boxes.npy", np.zeros((12, 4, 4), np.float32))
        return args

    return argv


def vocab_args(data: bytes):
    def argv(tmp: Path) -> list[str]:
        (tmp / "v.json").write_bytes(data)
        return precomp(tmp, "--vocab", str(tmp / "v.json"))

    return argv


def card_edit(edit):
    """``validate`` of a data set whose card was changed by ``edit(card dict) -> bytes``."""

    def argv(tmp: Path) -> list[str]:
        out = existing_data_set(tmp)
        card = json.loads((out / "dataset.json").read_text())
        (out / "dataset.json").write_bytes(edit(card))
        return ["validate", str(out)]

    return argv


def moved_files(card: dict, to) -> bytes:
    card["splits"]["train"]["files"] = [to(f) for f in card["splits"]["train"]["files"]]
    return json.dumps(card).encode()


def link_and_pipe(tmp: Path) -> None:
    import os

    d = tmp / "mine"
    d.mkdir()
    (tmp / "emptyd").mkdir()
    (d / "elink").symlink_to(tmp / "emptyd")
    os.mkfifo(d / "fifo")


def truncated_shard(tmp: Path) -> list[str]:
    out = existing_data_set(tmp)
    part = next((out / "train").glob("*.parquet"))
    part.write_bytes(part.read_bytes()[:-200])
    return ["validate", str(out)]


def missing_column(tmp: Path) -> list[str]:
    import pyarrow.parquet as pq

    out = existing_data_set(tmp)
    part = next((out / "train").glob("*.parquet"))
    pq.write_table(pq.read_table(part).drop_columns(["tokens"]), part)
    return ["validate", str(out)]


def damaged_set(**damage: int):
    """``validate`` of a data set with row 2 of its train shard damaged (``damage_row``)."""

    def argv(tmp: Path) -> list[str]:
        out = existing_data_set(tmp)
        damage_row(out, "train", 2, **damage)
        return ["validate", str(out)]

    return argv


def full_disk(tmp: Path) -> list[str]:
    """A small data set on the 2 MB file system at ``tmp/disk``, replaced by one too big."""
    from shan.data.synthetic import generate_synthetic

    out = tmp / "disk" / "mine"
    generate_synthetic(str(out), images={"train": 8}, regions=4, feature_dim=6, log=lambda s: None)
    return ["synthetic", "--out", str(out), "--overwrite", "--train", "2000", "--dev", "0",
            "--test", "0", "--regions", "36", "--feature-dim", "256"]  # fmt: skip


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MB tmpfs at ``tmp_path/disk`` for the test (unmounted after it)."""
    with mounted_tmpfs(tmp_path / "disk", "2m") as disk:
        yield disk


ROWS = np.random.default_rng(0).normal(size=(12, 4, 6)).astype(np.float32)
NAN_ROWS = ROWS.copy()
NAN_ROWS[3, 1, 2] = np.nan
OBJECTS = np.array([{"a": 1}] * 12, dtype=object)

CASES = [
    Case("out-holds-user-files", "prepare_data", "`--out` a folder holding the user's files",
         lambda t: (user_folder(t), synthetic_into(t))[1], ("mine", "already holds files")),
    Case("out-is-cwd", "prepare_data", "`--out .` (the working directory)", cwd_args,
         ("--out .", "already holds files")),
    Case("out-is-source", "prepare_data", "`precomp SRC --out SRC`",
         lambda t: precomp(t, out=str(make_precomp(t / "src"))), ("overlaps the source",)),
    Case("out-inside-source", "prepare_data", "`precomp SRC --out SRC/converted`",
         lambda t: precomp(t, out=str(make_precomp(t / "src") / "converted")),
         ("overlaps the source",)),
    Case("out-is-a-file", "prepare_data", "`--out` an existing file",
         lambda t: (t.joinpath("mine").write_text("x"), synthetic_into(t))[1],
         ("mine", "is a file")),
    Case("out-holds-data-set", "prepare_data", "`--out` a data set, without `--overwrite`",
         lambda t: (existing_data_set(t), synthetic_into(t))[1],
         ("already holds a data set", "--overwrite")),
    Case("overwrite-foreign-file", "prepare_data",
         "`--overwrite` of a data set folder that also holds other files",
         dataset_with_extra_file, ("README.txt", "not part of its data set")),
    Case("rows-per-file-0", "prepare_data", "`--rows-per-file 0`",
         lambda t: precomp(t, "--rows-per-file", "0"), ("--rows-per-file", "at least 1", "0")),
    Case("chunk-rows-0", "prepare_data", "`--chunk-rows 0`",
         lambda t: precomp(t, "--chunk-rows", "0"), ("--chunk-rows", "at least 1")),
    Case("chunk-rows-text", "prepare_data", "`--chunk-rows many`",
         lambda t: precomp(t, "--chunk-rows", "many"), ("--chunk-rows", "'many'")),
    Case("train-negative", "prepare_data", "`synthetic --train -5`",
         lambda t: synthetic_into(t, "--train", "-5"), ("--train", "-5")),
    Case("concepts-too-many", "prepare_data", "`synthetic --concepts 100000`",
         lambda t: synthetic_into(t, "--concepts", "100000"), ("concepts", "5..2000")),
    Case("no-images", "prepare_data", "`synthetic` with every split at 0 images",
         lambda t: ["synthetic", "--out", str(t / "d"), "--train", "0", "--dev", "0",
                    "--test", "0"], ("at least one split",)),
    Case("vocab-not-utf8", "prepare_data", "a vocabulary file that is not UTF-8",
         vocab_args(b'{"word2idx": {"caf\xe9": 4}}'), ("v.json", "UTF-8")),
    Case("vocab-not-json", "prepare_data", "a vocabulary file that is not JSON",
         vocab_args(b"<pad> 0\n<start> 1\n"), ("v.json", "not valid json")),
    Case("captions-not-utf8", "prepare_data", "a caption file that is not UTF-8",
         with_file("train_caps.txt", "un caf\xe9\n".encode("latin-1") * 60),
         ("train_caps.txt", "UTF-8")),
    Case("empty-caption", "prepare_data", "an empty caption line",
         with_file("train_caps.txt", b"a dog\n\n" + b"a cat\n" * 58), ("train_caps.txt",
         "line 2", "empty caption")),
    Case("nan-features", "prepare_data", "NaN in the region features",
         with_file("train_ims.npy", NAN_ROWS), ("train_ims.npy", "row 3", "NaN"),
         subprocess=True),
    Case("features-wrong-shape", "prepare_data", "features of the wrong shape (2-d)",
         with_file("train_ims.npy", ROWS[:, 0]), ("train_ims.npy", "(images, regions, dim)")),
    Case("features-pickled", "prepare_data", "a `.npy` holding pickled objects",
         with_file("train_ims.npy", OBJECTS), ("train_ims.npy", "allow_pickle")),
    Case("truncated-npy", "prepare_data", "a truncated `.npy` file",
         lambda t: _truncated_npy(t),
         ("train_ims.npy", "not a readable .npy")),
    Case("boxes-wrong-shape", "prepare_data", "boxes of the wrong shape",
         boxes(np.zeros((12, 4, 5), np.float32)), ("train_boxes.npy", "(12, 4, 4)")),
    Case("boxes-pickled", "prepare_data", "boxes holding pickled objects",
         boxes(OBJECTS), ("train_boxes.npy", "allow_pickle")),
    Case("boxes-some-splits", "prepare_data", "boxes for some splits only",
         with_file("train_boxes.npy", np.zeros((12, 4, 4), np.float32)),
         ("dev_boxes.npy missing",)),
    Case("ids-beyond-int64", "prepare_data", "an image id beyond 64 bits",
         with_file("train_ids.txt", "\n".join(["1"] * 11 + ["99999999999999999999"]).encode()),
         ("train_ids.txt", "id 12", "64 bits")),
    Case("ids-not-integers", "prepare_data", "an image id that is not an integer",
         with_file("train_ids.txt", "\n".join(["1"] * 11 + ["7b"]).encode()),
         ("train_ids.txt", "'7b'")),
    Case("source-missing", "prepare_data", "a source folder that does not exist",
         lambda t: ["precomp", str(t / "nowhere"), "--out", str(t / "out")],
         ("nowhere", "does not exist")),
    Case("validate-missing", "prepare_data", "`validate` of a path that does not exist",
         lambda t: ["validate", str(t / "nowhere")], ("nowhere", "does not exist")),
    Case("card-not-utf8", "prepare_data", "a card (`dataset.json`) that is not UTF-8",
         card_edit(lambda c: b'{"name": "caf\xe9"}'), ("dataset.json", "UTF-8")),
    Case("card-not-json", "prepare_data", "a card that is not JSON",
         card_edit(lambda c: b"name: demo\n"), ("dataset.json", "not a valid dataset card"),
         subprocess=True),
    Case("card-absolute-path", "prepare_data", "a card naming a file by an absolute path",
         card_edit(lambda c: moved_files(c, lambda f: "/etc/" + f)),
         ("dataset.json", "leaves the data set")),
    Case("card-dotdot-path", "prepare_data", "a card naming a file outside with `..`",
         card_edit(lambda c: moved_files(c, lambda f: "../other/" + f)),
         ("dataset.json", "leaves the data set")),
    Case("card-no-split", "prepare_data", "a card without any split",
         card_edit(lambda c: json.dumps({**c, "splits": {}}).encode()),
         ("dataset.json", "no split")),
    Case("split-is-a-path", "prepare_data", "`precomp --splits ../victim`",
         lambda t: precomp(t, "--splits", "../victim"), ("--splits ../victim", "split name")),
    Case("card-wrong-types", "prepare_data", "a card whose fields have the wrong types",
         card_edit(lambda c: json.dumps({**c, "checksums": [1]}).encode()),
         ("dataset.json", "checksums must map")),
    Case("card-lists-itself", "prepare_data", "a card listing `dataset.json` as a data file",
         card_edit(lambda c: moved_files(c, lambda f: "dataset.json")),
         ("dataset.json", "lists itself")),
    Case("out-holds-a-link", "prepare_data", "`--out` a folder holding only a link or a pipe",
         lambda t: (link_and_pipe(t), synthetic_into(t))[1], ("mine", "elink", "fifo")),
    Case("out-parent-missing", "prepare_data", "`--out` through a link to a missing folder",
         lambda t: (t.joinpath("mine").symlink_to(t / "gone" / "x"), synthetic_into(t))[1],
         ("mine", "does not exist")),
    Case("truncated-shard", "prepare_data", "a truncated Parquet shard", truncated_shard,
         ("part-00000.parquet", "not a readable Parquet")),
    Case("missing-column", "prepare_data", "a shard without its `tokens` column",
         missing_column, ("part-00000.parquet", "missing column 'tokens'")),
    Case("caption-200000-words", "prepare_data", "`validate` of a caption of 200,000 words",
         damaged_set(caption_words=200_000),
         ("train/part-00000.parquet", "row 2", "caption 0 has 200,000 words", "1,000")),
    Case("num-regions-beyond", "prepare_data", "`validate` of a row saying 10⁹ of its 4 regions",
         damaged_set(num_regions=10**9),
         ("train/part-00000.parquet", "row 2", "num_regions 1000000000 not in 1..4")),
    Case("disk-full", "prepare_data",
         "`synthetic --out` (with `--overwrite`) on a 2 MB file system it outgrows",
         full_disk, ("cannot write the data set", "disk/mine", "no space left on device"),
         needs=("small_disk",)),
]  # fmt: skip


def _truncated_npy(tmp: Path) -> list[str]:
    src = make_precomp(tmp / "src")
    data = (src / "train_ims.npy").read_bytes()
    (src / "train_ims.npy").write_bytes(data[: len(data) // 2])
    return precomp(tmp)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(case: Case, tmp_path: Path, request):
    for fixture in case.needs:
        request.getfixturevalue(fixture)
    args = case.argv(tmp_path)
    before = snapshot(tmp_path)
    cwd = tmp_path if "." in args else None
    r = run_case(case, *args, env=case.env, cwd=cwd)
    assert_user_error(r, *case.names, lines=case.lines)
    assert snapshot(tmp_path) == before  # nothing deleted, changed or added
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name]


def test_a_caption_file_with_a_byte_order_mark_converts(tmp_path: Path):
    from shan.data.reader import read_split

    src = make_precomp(tmp_path / "src")
    caps = (src / "train_caps.txt").read_text()
    (src / "train_caps.txt").write_bytes("\ufeff".encode() + caps.encode())
    r = run_main("prepare_data", *precomp(tmp_path))
    assert r.returncode == 0, r.stderr
    assert read_split(str(tmp_path / "out"), "train").captions == caps.split("\n")


def test_a_pickled_checkpoint_of_features_is_never_unpickled(tmp_path: Path):
    """``allow_pickle=False``: the bytes of a pickle that would run code are never loaded."""
    src = make_precomp(tmp_path / "src")
    flag = tmp_path / "ran"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (flag,))

    np.save(src / "train_ims.npy", np.array([Boom()], dtype=object), allow_pickle=True)
    assert pickle.dumps(Boom())  # a real payload
    r = run_main("prepare_data", *precomp(tmp_path))
    assert_user_error(r, "train_ims.npy")
    assert not flag.exists()


def test_a_missing_caption_file_is_the_last_line_and_writes_nothing(tmp_path: Path):
    src = make_precomp(tmp_path / "src")
    (src / "dev_caps.txt").unlink()
    r = run_main("prepare_data", "precomp", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert last_line(r.stderr).startswith("error: caption file")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()
