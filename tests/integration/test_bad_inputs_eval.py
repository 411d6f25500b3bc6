"""Every bad input of the evaluation job, run as a user would (``python jobs/evaluate.py``):
exit 2, one ``error:`` line naming the file, option or value, no traceback, no metrics.json,
and the output folder exactly as it was. They all fail before Ray starts: they run through the
job's ``main`` in the test process, two as subprocesses of ``jobs/evaluate.py``.

The checkpoints are a freshly initialised tiny model (no training) saved for a tiny synthetic
data set, then damaged in one way per case."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pickle
import shutil
import socket
import time
import zipfile
from pathlib import Path

import pytest

from tests.cli import Case, assert_user_error, run_case, run_job, snapshot
from tests.helpers import damage_row, save_untrained, untrained_on_synthetic

_BASE: dict[str, Path] = {}  # the tiny data set and checkpoint (the module's fixture)
_HELD: list[int] = []  # locks a case holds while the job runs


@pytest.fixture(scope="module", autouse=True)
def base(tmp_path_factory):
    _BASE.update(untrained_on_synthetic(tmp_path_factory.mktemp("bad-eval"), 8))
    yield _BASE
    _BASE.clear()


@pytest.fixture(autouse=True)
def release_held():
    yield
    while _HELD:
        os.close(_HELD.pop())


def ckpt(tmp: Path, name: str = "ck", **files: bytes | None) -> str:
    """A copy of the good checkpoint with ``files`` replaced (None: removed)."""
    dst = tmp / name
    shutil.copytree(_BASE["ckpt"], dst)
    for fname, content in files.items():
        path = dst / fname.replace("_", ".")
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content)
    return str(dst)


def args(tmp: Path, model: str | None = None, *extra: str, out: str | None = None) -> list[str]:
    return [
        "--model",
        model or str(_BASE["ckpt"]),
        "--data",
        str(_BASE["data"]),
        "--out",
        out or str(tmp / "out"),
        "--no-mlflow",
        *extra,
    ]


def _closed_port() -> int:
    """A port of 127.0.0.1 nobody listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data_with(**damage: int):
    """A copy of the data set, row 2 of its test shard damaged (``tests.helpers.damage_row``)."""

    def argv(tmp: Path) -> list[str]:
        data = tmp / "data"
        shutil.copytree(_BASE["data"], data)
        damage_row(data, "test", 2, **damage)
        a = args(tmp)
        a[a.index("--data") + 1] = str(data)
        return a

    return argv


def opt(*extra: str):
    """A case that only adds options to a good command line."""
    return lambda tmp: args(tmp, None, *extra)


def damaged(**files: bytes | None):
    return lambda tmp: args(tmp, ckpt(tmp, **files))


# -- crafted model.pt contents ---------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/shan-pwned",))


def _torch_bytes(obj) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _zip_not_torch() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.txt", "not a torch file")
    return buf.getvalue()


def _good_state() -> dict:
    import torch

    return torch.load(_BASE["ckpt"] / "model.pt", weights_only=True)["model"]


def _nan_weights() -> bytes:
    state = {k: v.clone() for k, v in _good_state().items()}
    first = next(iter(state))
    state[first].view(-1)[0] = float("inf")
    return _torch_bytes({"model": state})


def _truncated() -> bytes:
    data = (_BASE["ckpt"] / "model.pt").read_bytes()
    return data[: len(data) // 3]


def _wider_config() -> bytes:
    text = (_BASE["ckpt"] / "config.yaml").read_text()
    return text.replace("d: 16", "d: 32", 1).encode()


def _foreign_out(tmp: Path) -> list[str]:
    out = tmp / "out"
    (out / "tiles").mkdir(parents=True)
    (out / "metrics.json").write_text("{}")  # ours, from an earlier evaluation
    (out / "notes.txt").write_text("my thesis notes")
    return args(tmp)


def _out_is_file(tmp: Path) -> list[str]:
    (tmp / "out").write_text("a file")
    return args(tmp)


def _locked_out(tmp: Path) -> list[str]:
    out = tmp / "out"
    out.mkdir()
    fd = os.open(out / "eval.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    os.pwrite(fd, json.dumps(info).encode(), 0)
    _HELD.append(fd)
    return args(tmp)


def _locked_s3_out(tmp: Path) -> list[str]:
    from shan.data import fs

    out = f"s3://shan/tests/locked-{time.time_ns()}"
    now = time.time()
    info = {"host": "elsewhere", "pid": 4242, "token": "t", "started": now, "heartbeat": now}
    fs.write_bytes(f"{out}/eval.lock", json.dumps(info).encode())
    return args(tmp, None, out=out)


def _s3_model_escaping(tmp: Path) -> list[str]:
    import s3fs

    prefix = f"tests/evil-model-{time.time_ns()}"
    s3 = s3fs.S3FileSystem()
    for f in Path(_BASE["ckpt"]).iterdir():
        s3.call_s3("put_object", Bucket="shan", Key=f"{prefix}/{f.name}", Body=f.read_bytes())
    s3.call_s3("put_object", Bucket="shan", Key=f"{prefix}/../../escaped.txt", Body=b"x")
    return args(tmp, f"s3://shan/{prefix}")


def _wrong_vocab(tmp: Path) -> list[str]:
    """A sound checkpoint of a model trained on other words."""
    from shan.vocab import Vocabulary

    return args(tmp, str(save_untrained(tmp / "other", Vocabulary(["other", "words"]))))


def _head(tmp: Path, name: str = "head") -> str:
    """A checkpoint of the tiny model with a first-stage head (what --rerank needs)."""
    from shan.data.format import load_vocab

    vocab = load_vocab(str(_BASE["data"]))
    folder = save_untrained(tmp / name, vocab, overrides=("model.first_stage_dim=8",))
    return str(folder)


def rerank(*extra: str, head: bool = True):
    """A good command line with ``--rerank`` options, of a model with a head (``head``)."""
    return lambda tmp: args(tmp, _head(tmp) if head else None, *extra)


CASES: list[Case] = [
    # options
    Case("tile-images-negative", "evaluate", "`--tile-images -1`", opt("--tile-images", "-1"),
         ("--tile-images", "-1")),
    Case("tile-images-zero", "evaluate", "`--tile-images 0`", opt("--tile-images", "0"),
         ("--tile-images", "0")),
    Case("tile-captions-zero", "evaluate", "`--tile-captions 0`", opt("--tile-captions", "0"),
         ("--tile-captions", "0")),
    Case("tile-images-not-a-number", "evaluate", "`--tile-images many`",
         opt("--tile-images", "many"), ("--tile-images", "many")),
    Case("actors-zero", "evaluate", "`--actors 0`", opt("--actors", "0"), ("--actors", "0")),
    Case("cpus-per-actor-zero", "evaluate", "`--cpus-per-actor 0`",
         opt("--cpus-per-actor", "0"), ("--cpus-per-actor", "0")),
    Case("cpus-per-actor-nan", "evaluate", "`--cpus-per-actor nan`",
         opt("--cpus-per-actor", "nan"), ("--cpus-per-actor", "nan")),
    Case("gpus-per-actor-negative", "evaluate", "`--gpus-per-actor -1`",
         opt("--gpus-per-actor", "-1"), ("--gpus-per-actor", "-1")),
    Case("gpus-per-actor-not-whole", "evaluate", "`--gpus-per-actor 1.5` (not whole, above 1)",
         opt("--gpus-per-actor", "1.5"), ("--gpus-per-actor", "1.5")),
    Case("protocol-unknown", "evaluate", "`--protocol coco-2k`", opt("--protocol", "coco-2k"),
         ("--protocol", "coco-2k")),
    Case("promote-without-mlflow", "evaluate", "`--promote` with `--no-mlflow`",
         lambda tmp: args(tmp, "models:/shan@candidate", "--promote", "champion"),
         ("--promote", "--no-mlflow")),
    Case("promote-not-registered", "evaluate", "`--promote` of a model that is not `models:/...`",
         lambda tmp: [a for a in args(tmp, None, "--promote", "champion") if a != "--no-mlflow"],
         ("--promote", "models:/")),
    Case("rerank-zero", "evaluate", "`--rerank 0`", rerank("--rerank", "0"), ("rerank", "0")),
    Case("rerank-below-recall-k", "evaluate", "`--rerank 5` (K smaller than R@10's 10)",
         rerank("--rerank", "5"), ("rerank", "5", ">= 10")),
    Case("rerank-beyond-the-split", "evaluate",
         "`--rerank 41` on a split of 8 images x 40 captions",
         rerank("--rerank", "41"), ("--rerank 41", "larger than the split")),
    Case("rerank-without-a-first-stage", "evaluate",
         "`--rerank` of a checkpoint without a first-stage head",
         rerank("--rerank", "10", head=False), ("ck", "no first-stage head")),
    Case("rerank-with-ensemble", "evaluate", "`--rerank` with `--ensemble`",
         lambda tmp: args(tmp, _head(tmp), "--rerank", "10", "--ensemble", _head(tmp, "h2")),
         ("--rerank", "--ensemble")),
    Case("compare-without-exhaustive", "evaluate",
         "`--rerank --compare DIR` where DIR holds no exhaustive evaluation",
         lambda tmp: args(tmp, _head(tmp), "--rerank", "10", "--compare", str(tmp)),
         ("--compare", "no finished exhaustive evaluation")),
    Case("compare-without-rerank", "evaluate", "`--compare DIR` without `--rerank`",
         opt("--compare", "elsewhere"), ("compare", "rerank")),
    # the model
    Case("mlflow-unreachable", "evaluate",
         "`--model RUN_ID` (or `runs:/`, `models:/`) with `MLFLOW_TRACKING_URI` at a closed port",
         lambda tmp: args(tmp, "0123456789abcdef0123456789abcdef"),
         ("MLflow tracking server http://alice:***@127.0.0.1:", "is unreachable"),
         env={"MLFLOW_TRACKING_URI": f"http://alice:s3cret@127.0.0.1:{_closed_port()}"}),
    Case("model-missing", "evaluate", "`--model` a folder that does not exist",
         lambda tmp: args(tmp, str(tmp / "nowhere")), ("nowhere", "model.pt")),
    Case("model-pt-missing", "evaluate", "a checkpoint without `model.pt`",
         damaged(model_pt=None), ("model.pt",)),
    Case("model-pt-truncated", "evaluate", "a truncated `model.pt`",
         lambda tmp: args(tmp, ckpt(tmp, model_pt=_truncated())), ("model.pt",)),
    Case("model-pt-random-bytes", "evaluate", "`model.pt` of random bytes",
         damaged(model_pt=os.urandom(2048)), ("model.pt",)),
    Case("model-pt-crafted-pickle", "evaluate",
         "`model.pt` a pickle that runs code (refused by `weights_only`)",
         damaged(model_pt=pickle.dumps(_Evil())), ("model.pt", "cannot be loaded"),
         subprocess=True),
    Case("model-pt-zip-not-torch", "evaluate", "`model.pt` a zip that is not a torch file",
         lambda tmp: args(tmp, ckpt(tmp, model_pt=_zip_not_torch())), ("model.pt",)),
    Case("model-pt-no-model-key", "evaluate", "`model.pt` a dict without `\"model\"`",
         lambda tmp: args(tmp, ckpt(tmp, model_pt=_torch_bytes({"weights": {}}))),
         ("model.pt", "'model'")),
    Case("model-pt-does-not-match-config", "evaluate",
         "`model.pt` weights that do not fit `config.yaml`",
         lambda tmp: args(tmp, ckpt(tmp, config_yaml=_wider_config())),
         ("model.pt", "config.yaml")),
    Case("model-pt-non-finite", "evaluate", "`model.pt` with an infinite weight",
         lambda tmp: args(tmp, ckpt(tmp, model_pt=_nan_weights())),
         ("model.pt", "NaN or infinite")),
    Case("config-not-utf8", "evaluate", "`config.yaml` that is not UTF-8",
         damaged(config_yaml=b"name: \xff\xfe\n"), ("config.yaml", "UTF-8")),
    Case("config-not-yaml", "evaluate", "`config.yaml` that is not YAML",
         damaged(config_yaml=b"model: [unclosed\n"), ("config.yaml", "YAML")),
    Case("vocab-not-utf8", "evaluate", "`vocab.json` that is not UTF-8",
         damaged(vocab_json=b"{\"word2idx\": {\"\xff\": 0}}"), ("vocab.json", "UTF-8")),
    Case("vocab-not-json", "evaluate", "`vocab.json` that is not JSON",
         damaged(vocab_json=b"{not json"), ("vocab.json", "json")),
    Case("model-vocab-not-the-data", "evaluate", "a model whose vocabulary is not the data set's",
         _wrong_vocab, ("vocabulary",)),
    Case("ensemble-member-damaged", "evaluate", "an `--ensemble` model with a damaged `model.pt`",
         lambda tmp: args(tmp, None, "--ensemble", ckpt(tmp, "member", model_pt=b"junk")),
         ("member", "model.pt")),
    Case("model-s3-key-escapes", "evaluate",
         "an `s3://` model with a key `prefix/../../x` (would land outside the download folder)",
         _s3_model_escaping, ("../../escaped.txt", "outside"), needs=("s3",)),
    # data
    Case("data-missing", "evaluate", "`--data` that does not exist",
         lambda tmp: [*args(tmp)[:3], str(tmp / "no-data"), *args(tmp)[4:]], ("no-data",)),
    Case("split-unknown", "evaluate", "`--split` the data set does not have",
         opt("--split", "nope"), ("'nope'",)),
    Case("data-num-regions-beyond", "evaluate",
         "a data row whose `num_regions` says 10⁹ of its 4 regions",
         _data_with(num_regions=10**9), ("part-00000.parquet", "row 2", "num_regions 1000000000")),
    # the output location
    Case("out-foreign-files", "evaluate", "`--out` holding files that are not an evaluation's",
         _foreign_out, ("--out", "notes.txt")),
    Case("out-is-a-file", "evaluate", "`--out` a file", _out_is_file, ("--out", "is a file")),
    Case("out-locked", "evaluate", "`--out` another evaluation is writing (local lock)",
         _locked_out, ("--out", "eval.lock", "another evaluation"),
         subprocess=True),  # the lock's holder is this process: the job runs in another
    Case("out-locked-s3", "evaluate", "`s3://` `--out` another evaluation is writing (lock object)",
         _locked_s3_out, ("eval.lock", "host elsewhere, pid 4242"), needs=("s3",)),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_evaluation_input(case: Case, tmp_path, request):
    if "s3" in case.needs:
        request.getfixturevalue("s3_root")
    argv = case.argv(tmp_path)
    out = argv[argv.index("--out") + 1]
    existed = Path(out).exists()
    before = snapshot(tmp_path)
    r = run_case(case, *argv, env=case.env, timeout=120)
    assert_user_error(r, *case.names, lines=case.lines)
    assert "scoring on" not in r.stdout + r.stderr  # failed before any actor started
    # nothing written, deleted or changed: the user's files and an earlier evaluation's alike
    assert snapshot(tmp_path) == before
    assert existed or not Path(out).exists()
    if out.startswith("s3://"):
        from shan.data import fs

        assert not fs.exists(f"{out}/metrics.json")
        assert [p.rsplit("/", 1)[1] for p in _s3_list(out)] in ([], ["eval.lock"])
    assert not Path("/tmp/shan-pwned").exists()


def _s3_list(url: str) -> list[str]:
    import pyarrow.fs as pafs

    from shan.data import fs

    filesystem, root = fs.filesystem(url)
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return [i.path for i in infos if i.type == pafs.FileType.File]


@pytest.mark.parametrize(
    ("job", "ref"),
    [
        ("search", "0123456789abcdef0123456789abcdef"),
        ("search", "runs:/0123456789abcdef0123456789abcdef/model"),
        ("evaluate", "models:/shan-demo@champion"),
    ],
)
def test_an_unreachable_mlflow_server_is_one_line_in_seconds(job, ref, tmp_path):
    """A model named by MLflow, with MLflow's address at a closed port: one line naming the
    server without its password, in well under 30 s (not MLflow's retries, about 4 min)."""
    port = _closed_port()
    uri = f"http://alice:s3cret@127.0.0.1:{port}"
    args = ["--model", ref, "--data", str(_BASE["data"])]
    args += ["a dog"] if job == "search" else ["--out", str(tmp_path / "out")]
    t0 = time.monotonic()
    r = run_job(job, *args, env={"MLFLOW_TRACKING_URI": uri}, timeout=120)
    seconds = time.monotonic() - t0
    print(f"{job} --model {ref}: {seconds:.1f} s to: {r.error_lines}")
    assert_user_error(r, f"MLflow tracking server http://alice:***@127.0.0.1:{port}", "unreachable")
    assert "s3cret" not in r.stdout + r.stderr
    assert seconds < 30
