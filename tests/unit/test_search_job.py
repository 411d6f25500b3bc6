"""The whole search (``shan.search.job``) and its command line (``shan search``): a tiny
synthetic data set and an untrained tiny checkpoint; JSON output, the picture, the cache's
rebuild for another model, and bad inputs as one ``error:`` line with status 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from shan.checkpoint import load_model
from shan.data.reader import read_split
from shan.errors import JobError
from shan.scoring import score_matrix
from shan.vocab import Vocabulary
from shan_cli import run_job
from shan_cli.search import main, read_queries
from tests.helpers import ROOT, save_untrained


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(data set root, checkpoint folder, a second checkpoint, a sentence of the data)."""
    from shan.data.synthetic import generate_synthetic

    tmp = tmp_path_factory.mktemp("search")
    root = tmp / "data"
    generate_synthetic(str(root), images={"test": 6}, regions=4, feature_dim=16, concepts=6,
                       captions_per_image=2, log=lambda s: None)  # fmt: skip
    vocab = Vocabulary.load(root / "vocab.json")
    ck1 = save_untrained(tmp / "ck1", vocab, seed=0)
    ck2 = save_untrained(tmp / "ck2", vocab, seed=1)
    return str(root), str(ck1), str(ck2), read_split(str(root), "test").captions[3]


def _run(argv, capsys):
    with pytest.raises(SystemExit) as info:
        run_job(lambda: main(argv))
    out, err = capsys.readouterr()
    return info.value.code, out, err


def test_json_matches_the_library_matrix_and_a_picture_is_drawn(setup, tmp_path, capsys):
    root, ck1, ck2, sentence = setup
    cache, picture = tmp_path / "cache", tmp_path / "best.png"
    argv = ["--model", ck1, "--data", root, "-k", "3", "--json", "--cache", str(cache)]
    code, out, err = _run([*argv, sentence, "--picture", str(picture)], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert [d["query"] for d in doc] == [sentence] and len(doc[0]["matches"]) == 3
    split, model = read_split(root, "test"), load_model(ck1).model
    vocab = Vocabulary.load(f"{root}/vocab.json")
    full = score_matrix(model, split.features, split.num_regions, [vocab.encode(sentence)],
                        torch.device("cpu"), bf16=False)  # fmt: skip
    col = full["total"][:, 0]
    for rank, m in enumerate(doc[0]["matches"], 1):
        assert m["rank"] == rank and m["image"] == int(split.image_ids[m["row"]])
        for key in ("total", "l2l", "g2l", "g2g"):
            assert m[key] == pytest.approx(float(full[key][m["row"], 0]), abs=1e-5)
    assert [m["row"] for m in doc[0]["matches"]] == sorted(range(6), key=lambda r: -col[r])[:3]
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "encoded" in err and len(list(cache.iterdir())) == 1
    assert "encode images: 100% (6/6 images)" in err  # the index build reports its progress
    # warm: the index comes from the cache; the picture (ours) may be replaced
    code, out2, err = _run([*argv, sentence, "--picture", str(picture)], capsys)
    assert code == 0 and json.loads(out2) == doc and "encoded" not in err
    assert "encode images" not in err
    # another model: a new index, beside the first
    code, out3, err = _run([*argv[:1], ck2, *argv[2:], sentence], capsys)
    assert code == 0 and "encoded" in err and len(list(cache.iterdir())) == 2
    assert json.loads(out3) != doc


def test_bad_inputs_are_one_error_line(setup, tmp_path, capsys):
    root, ck1, _, sentence = setup
    base = ["--model", ck1, "--data", root, "--cache", str(tmp_path / "c")]
    foreign = tmp_path / "mine.png"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n a picture of the user's")
    cases = [
        ([*base, "  "], "query 1 is empty"),
        ([*base, sentence, "zebra okapi"], "query 2 ('zebra okapi'): none of its words"),
        ([*base, "--split", "val", sentence], "has no split 'val'"),
        (["--model", str(tmp_path / "nope"), *base[2:], sentence], "no checkpoint there"),
        ([*base, "--queries", str(tmp_path / "q.txt")], "does not exist"),
        ([*base, sentence, "--picture", str(foreign)], "is not a search's picture"),
        ([*base, sentence, "--picture", str(tmp_path / "x.jpg")], "ending in .png"),
    ]
    for argv, message in cases:
        code, out, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        assert message in lines[0] and out == ""
    assert foreign.read_bytes().endswith(b"user's")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_every_bad_option_is_its_own_error_line(setup, tmp_path, capsys):
    root, ck1, _, sentence = setup
    (tmp_path / "file").write_text("x")
    argv = ["--model", ck1, "--data", root, "--cache", str(tmp_path / "file"),
            "--picture", str(tmp_path / "x.jpg"), sentence]  # fmt: skip
    code, out, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 2, err
    assert "--cache" in lines[0] and "is a file, not a folder" in lines[0]
    assert "--picture" in lines[1] and "ending in .png" in lines[1]


def test_the_options_report_every_problem_at_once(tmp_path):
    from shan.errors import ConfigError, problems
    from shan.search.job import SearchOptions

    assert SearchOptions().problems() == []
    opts = SearchOptions(top=0, cache="s3://bucket/idx", picture=str(tmp_path / "no" / "x.png"))
    with pytest.raises(ConfigError) as e:
        opts.check()
    assert problems(e.value) == [
        "top must be an integer >= 1, got 0",
        "--cache s3://bucket/idx: the index cache must be a local folder",
        f"--picture {tmp_path / 'no' / 'x.png'}: folder {tmp_path / 'no'} does not exist",
    ]


def test_queries_file_and_table_through_the_shim(setup, tmp_path):
    root, ck1, _, sentence = setup
    queries = tmp_path / "q.txt"
    queries.write_text(f"{sentence}\n\n{sentence} zebra\n")
    r = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "search.py"), "--model", ck1, "--data", root,
         "--queries", str(queries), "--top", "2", "--cache", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    blocks = r.stdout.strip().split("\n\n")
    assert len(blocks) == 2 and "not in the vocabulary: zebra" in blocks[1]
    assert [line.split()[0] for line in blocks[0].splitlines()[1:]] == ["rank", "1", "2"]


def test_a_picture_that_cannot_be_written_is_one_error_not_a_traceback(tmp_path, monkeypatch):
    from shan.errors import ConfigError, JobError
    from shan.search import job

    # a folder the search may not write in: refused before any image is encoded
    monkeypatch.setattr(job.os, "access", lambda path, mode: False)
    with pytest.raises(ConfigError, match=r"--picture .*best\.png: cannot write in folder"):
        job.SearchOptions(picture=str(tmp_path / "best.png")).check()
    monkeypatch.undo()
    # a failure while writing (a full disk, a folder gone) is a JobError naming the file
    gone = tmp_path / "gone"
    with pytest.raises(JobError, match=r"--picture .*x\.png: cannot write it"):
        job.write_picture(str(gone / "x.png"), b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    assert not gone.exists()


def test_a_queries_file_is_read_bounded(tmp_path):
    from shan.search.query import MAX_QUERIES, MAX_QUERY_CHARS

    with pytest.raises(JobError, match=r"--queries /dev/zero: line 1 is longer than 2,000 "):
        read_queries("/dev/zero")  # read 2,002 characters, not until memory runs out
    long = tmp_path / "long.txt"
    long.write_text("a dog\n" + "b" * (MAX_QUERY_CHARS + 1) + "\n")
    with pytest.raises(JobError, match=rf"{long}: line 2 is longer than 2,000 characters"):
        read_queries(str(long))
    edge = tmp_path / "edge.txt"
    edge.write_text("c" * MAX_QUERY_CHARS + "\r\n\n  a dog  \n")
    assert read_queries(str(edge)) == ["c" * MAX_QUERY_CHARS, "a dog"]
    many = tmp_path / "many.txt"
    many.write_text("a dog\n" * (MAX_QUERIES + 1))
    with pytest.raises(JobError, match=rf"{many} holds more than 1,000 sentences"):
        read_queries(str(many))
    blank = tmp_path / "blank.txt"
    blank.write_text("\n" * (MAX_QUERIES * 10 + 1))
    with pytest.raises(JobError, match=rf"{blank} has more than 10,000 lines"):
        read_queries(str(blank))
