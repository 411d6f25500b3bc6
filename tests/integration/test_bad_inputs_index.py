"""Bad inputs of ``jobs/index.py`` (``shan index build``), through the real command line: exit
2, one ``error:`` line naming the flag, file or value, no traceback, and nothing written,
deleted or changed (no index, no staging folder). Every case fails before an image is encoded
(so before Ray starts: the cases run the job's ``main`` in this process)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli import Case, assert_user_error, run_case, snapshot
from tests.helpers import untrained_with_first_stage

_BASE: dict[str, Path] = {}  # the tiny data set and checkpoints (the module's fixture)


@pytest.fixture(scope="module", autouse=True)
def base(tmp_path_factory):
    _BASE.update(untrained_with_first_stage(tmp_path_factory.mktemp("bad-index"), 6))
    yield _BASE
    _BASE.clear()


def args(tmp: Path, *extra: str, model: Path | None = None, out: str | None = None) -> list[str]:
    model_ref = str(model or _BASE["ckpt"])
    dest = out or str(tmp / "idx")
    return ["build", "--model", model_ref, "--data", str(_BASE["data"]), "--out", dest, *extra]


def opt(*extra: str):
    return lambda tmp: args(tmp, *extra)


def _no_first_stage(tmp: Path) -> list[str]:
    return args(tmp, model=_BASE["plain"])


def _foreign_out(tmp: Path) -> list[str]:
    (tmp / "idx").mkdir()
    (tmp / "idx" / "notes.txt").write_text("mine")
    return args(tmp)


def _out_is_file(tmp: Path) -> list[str]:
    (tmp / "idx").write_text("mine")
    return args(tmp)


def _another_index(tmp: Path) -> list[str]:
    """DEST holds the index of another model (same data and split)."""
    from shan.data.format import load_vocab
    from shan.indexing import IndexOptions, build_index
    from tests.helpers import first_stage_config, save_untrained

    vocab = load_vocab(str(_BASE["data"]))
    other = save_untrained(tmp / "other", vocab, first_stage_config(tmp), seed=1)
    build_index(str(other), str(_BASE["data"]), "test", str(tmp / "idx"),
                IndexOptions(local=True), log=lambda s: None)  # fmt: skip
    return args(tmp)


def _missing_data(tmp: Path) -> list[str]:
    argv = args(tmp)
    argv[argv.index("--data") + 1] = str(tmp / "nowhere")
    return argv


CASES: list[Case] = [
    Case("model-without-first-stage", "index",
         "a model without a first-stage head (`model.first_stage_dim` 0, an old checkpoint)",
         _no_first_stage, ("has no first-stage head", "model.first_stage_dim")),
    Case("split-missing", "index", "`--split` the data set does not have",
         opt("--split", "nope"), ("has no split 'nope'",)),
    Case("data-missing", "index", "`--data` a folder that does not exist",
         _missing_data, ("nowhere", "does not exist")),
    Case("kind-unknown", "index", "`--kind pq`", opt("--kind", "pq"), ("--kind", "'pq'")),
    Case("batch-size-zero", "index", "`--batch-size 0`", opt("--batch-size", "0"),
         ("--batch-size", "at least 1")),
    Case("shard-size-zero", "index", "`--shard-size 0`", opt("--shard-size", "0"),
         ("--shard-size", "at least 1")),
    Case("out-foreign", "index", "`--out` a folder holding other files",
         _foreign_out, ("--out", "notes.txt", "nothing was written")),
    Case("out-is-a-file", "index", "`--out` a file", _out_is_file, ("--out", "is a file")),
    Case("out-another-index", "index",
         "`--out` holding the index of another model, without `--overwrite`",
         _another_index, ("already holds an index", "--overwrite")),
    Case("out-unreachable-bucket", "index", "`--out` in an `s3://` bucket that does not exist",
         lambda tmp: args(tmp, out="s3://no-such-bucket/idx"),
         ("s3://no-such-bucket/idx", "bucket no-such-bucket"), needs=("s3",)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_index_input(case: Case, tmp_path, request):
    if "s3" in case.needs:
        request.getfixturevalue("s3_root")
    argv = case.argv(tmp_path)
    out = argv[argv.index("--out") + 1]
    existed = Path(out).exists()
    before = snapshot(tmp_path)
    r = run_case(case, *argv, env=case.env, timeout=120)
    assert_user_error(r, *case.names, lines=case.lines)
    assert "encode images" not in r.stdout + r.stderr and r.stdout == ""
    assert snapshot(tmp_path) == before  # nothing written, deleted or changed
    assert existed or not Path(out).exists()
    assert not list(tmp_path.glob(".idx.partial-*"))  # no staging folder left
