"""Bad inputs of ``jobs/search.py``, through the real command line: exit 2, one ``error:`` line
of bounded length naming the query, file or value, no traceback, no results, and nothing
written (no index cached). The data set is a tiny synthetic one and the model an untrained
tiny checkpoint; every case fails before an image is encoded. The ``--index`` cases use indexes
built in this process with the index library: one of a tiny model with a first-stage head, one
of another such model (other weights), one of another data set."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.cli import Case, assert_user_error, run_job, snapshot
from tests.helpers import damage_row, untrained_on_synthetic
from tests.rerank_helpers import build_index, save_untrained_first_stage

_BASE: dict[str, Path] = {}  # the tiny data set and checkpoint (the module's fixture)
LONGEST_LINE = 400  # characters: an error line never carries a whole query or word list


@pytest.fixture(scope="module", autouse=True)
def base(tmp_path_factory):
    from shan.data.format import load_vocab

    tmp = tmp_path_factory.mktemp("bad-search")
    _BASE.update(untrained_on_synthetic(tmp, 6))
    vocab = load_vocab(str(_BASE["data"]))
    _BASE["fs"] = save_untrained_first_stage(tmp / "fs", vocab)
    _BASE["other"] = save_untrained_first_stage(tmp / "other", vocab, seed=1)
    _BASE["index"] = tmp / "index"
    build_index(_BASE["fs"], _BASE["data"], _BASE["index"])
    _BASE["other_index"] = tmp / "other-index"
    build_index(_BASE["other"], _BASE["data"], _BASE["other_index"])
    (tmp / "b").mkdir()
    other_data = untrained_on_synthetic(tmp / "b", 8)["data"]  # same vocabulary, other data
    _BASE["other_data"] = other_data
    yield _BASE
    _BASE.clear()


def args(tmp: Path, *extra: str, data: Path | None = None) -> list[str]:
    model, root = str(_BASE["ckpt"]), str(data or _BASE["data"])
    return ["--model", model, "--data", root, "--cache", str(tmp / "cache"), *extra]


def query(text: str):
    return lambda tmp: args(tmp, text)


def queries(lines: list[str] | None = None, path: str | None = None):
    """``--queries`` a file of ``lines`` (or the file ``path``)."""

    def argv(tmp: Path) -> list[str]:
        file = path or str(tmp / "q.txt")
        if lines is not None:
            Path(file).write_text("\n".join(lines) + "\n")
        return args(tmp, "--queries", file)

    return argv


def regions_beyond(tmp: Path) -> list[str]:
    data = tmp / "data"
    shutil.copytree(_BASE["data"], data)
    damage_row(data, "test", 2, num_regions=10**9)
    return args(tmp, "a red thing", data=data)


def indexed(*extra: str, model: str = "fs", index: str | None = "index", data: bool = False):
    """A search through an index: the first-stage model ``model`` (a key of the fixture),
    the index ``index`` (a key, or a path under the case's tmp), ``--data`` when ``data``."""

    def argv(tmp: Path) -> list[str]:
        where = str(_BASE[index]) if index in _BASE else str(tmp / str(index))
        out = ["--model", str(_BASE[model]), "--index", where, "--cache", str(tmp / "cache")]
        return out + (["--data", str(_BASE["other_data"])] if data else []) + [*extra, "a red"]

    return argv


def foreign_index(tmp: Path) -> list[str]:
    (tmp / "notes").mkdir()
    (tmp / "notes" / "todo.txt").write_text("not an index\n")
    return indexed(index="notes")(tmp)


UNKNOWN = " ".join(f"zq{i}" for i in range(150))

CASES: list[Case] = [
    Case("query-100000-characters", "search", "a query of 100,000 characters of unknown words",
         query("zq " * 33_334), ("query 1", "100,002 characters", "at most 2,000")),
    Case("query-too-many-words", "search", "a query of 300 words",
         query("a " * 300), ("query 1", "300 words", "at most 200")),
    Case("query-punctuation-only", "search", "a query of punctuation only (`. , .`)",
         query(". , ."), ("query 1", "'. , .'", "only punctuation")),
    Case("query-150-unknown-words", "search", "a query of 150 words the model does not know",
         query(UNKNOWN), ("none of its words", "zq0, zq1", "and 140 more")),
    Case("queries-dev-zero", "search", "`--queries /dev/zero`",
         queries(path="/dev/zero"), ("--queries /dev/zero", "line 1 is longer than 2,000")),
    Case("queries-long-line", "search", "`--queries` with a line of 5,000 characters",
         queries(["a dog", "a cat", "x" * 5000]), ("q.txt", "line 3 is longer than 2,000")),
    Case("queries-too-many", "search", "`--queries` with 1,001 sentences",
         queries(["a dog"] * 1001), ("q.txt", "more than 1,000 sentences")),
    Case("data-num-regions-beyond", "search",
         "a data row whose `num_regions` says 10⁹ of its 4 regions", regions_beyond,
         ("test/part-00000.parquet", "row 2", "num_regions 1000000000 not in 1..4")),
    Case("rerank-below-top", "search", "`--rerank 3 -k 5`: K smaller than k",
         indexed("--rerank", "3", "-k", "5"), ("--rerank 3 is smaller than --top 5",)),
    Case("rerank-zero", "search", "`--rerank 0`",
         indexed("--rerank", "0"), ("rerank must be an integer >= 1, got 0",)),
    Case("rerank-without-index", "search", "`--rerank 10` without `--index`",
         lambda tmp: args(tmp, "--rerank", "10", "a red"), ("--rerank 10", "give --index")),
    Case("index-missing", "search", "`--index` a folder that does not exist",
         indexed(index="nowhere"), ("nowhere", "does not exist")),
    Case("index-foreign", "search", "`--index` a folder of other files (no `index.json`)",
         foreign_index, ("notes", "is not an index", "todo.txt")),
    Case("index-of-another-model", "search", "`--index` built from another model",
         indexed(index="other_index"), ("other-index", "was built from model", "not from model")),
    Case("index-of-another-data-set", "search",
         "`--index` with `--data` a data set it was not built from",
         indexed(data=True), ("index", "another data set")),
    Case("index-other-split", "search", "`--split dev` with an index of the test split",
         indexed("--split", "dev"), ("holds split 'test'", "not 'dev'")),
    Case("index-picture-without-data", "search", "`--picture` with `--index` but no `--data`",
         lambda tmp: indexed("--picture", str(tmp / "best.png"))(tmp),
         ("--picture", "needs --data")),
    Case("index-model-without-head", "search",
         "`--index` with a model that has no first-stage head",
         indexed(model="ckpt"), ("has no first-stage head",)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_search_input(case: Case, tmp_path: Path):
    argv = case.argv(tmp_path)
    before = snapshot(tmp_path)
    r = run_job(case.job, *argv, env=case.env, timeout=120)
    assert_user_error(r, *case.names, lines=case.lines)
    assert r.stdout == ""  # no results
    assert max(len(line) for line in r.stderr.splitlines()) <= LONGEST_LINE, r.stderr[:1000]
    assert snapshot(tmp_path) == before and not (tmp_path / "cache").exists()
