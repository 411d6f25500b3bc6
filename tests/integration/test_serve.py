"""The registered model served on 127.0.0.1 by ``shan serve`` (MLflow's scoring app behind the
request guard): ``/invocations`` answers the four score matrices of the library's scorer; a bad
request (a wrong type, a flood of 100,000 x 100,000 scores) gets a 400 naming the field, JSON
nested 100,000 deep a 400 naming the depth limit, a body over ``--max-body-bytes`` a 413, none of
them a traceback, and a good request after them all is answered. The model is an untrained tiny
checkpoint logged into the session's MLflow server (no training).

The served search, by MLflow's own ``mlflow models serve --env-manager local``: a tiny
checkpoint with a first-stage head, logged and registered, served with ``SHAN_SERVE_INDEX``
naming an index of it (built in this process with the index library); a request with empty
features and counts is answered with the best images of its captions and their scores, those
``shan search --index`` ranks; K below k is a 400 naming the param; a scoring request is still
answered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from shan_stack import free_port

from shan.model import SCORES
from tests.helpers import library_scores, log_tiny_model, scoring_request, untrained_on_synthetic
from tests.rerank_helpers import build_index, save_untrained_first_stage

MAX_BODY = 16_000_000  # shan serve --max-body-bytes: above the 100,000-image flood (9.6 MB)


def post_raw(url: str, data: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def post(url: str, body: dict) -> tuple[int, dict]:
    status, raw = post_raw(url, json.dumps(body).encode())
    assert b"Traceback" not in raw and b"stack_trace" not in raw, raw[:3000]
    return status, json.loads(raw or b"{}")


def refused(url: str, body: dict, field: str) -> str:
    """The message of a 400 that names ``field``, printed as the test's output."""
    status, answer = post(url, body)
    message = answer.get("message", "")
    print(f"HTTP {status}: ...{message[message.find('Error: ') :][:300]}")
    assert status == 400 and f"Error: {field}: " in message, (status, message[-2000:])
    return message


def wait_for_ping(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, f"the scoring server exited with {proc.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """The server and its workers (its process group): TERM, then KILL."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)
    except ProcessLookupError:
        pass


def test_shan_serve_scores_like_the_library_and_refuses_hostile_requests(services, tmp_path):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    logged = log_tiny_model(tmp_path, name="shan-serve", alias="champion", uri=uri)
    port = free_port()
    cmd = [sys.executable, "-m", "shan_cli", "serve", "--model", "models:/shan-serve@champion",
           "--port", str(port), "--max-body-bytes", str(MAX_BODY)]  # fmt: skip
    with served(cmd, port, tmp_path) as base:
        req = scoring_request()
        body = {"inputs": {k: np.asarray(v).tolist() for k, v in req.items()}}
        status, answer = post(f"{base}/invocations", body)
        assert status == 200, answer
        got, want = answer["predictions"], library_scores(logged["ckpt"], req)
        assert sorted(got) == sorted(SCORES)
        for key in SCORES:
            np.testing.assert_allclose(np.array(got[key], np.float32), want[key], atol=1e-5)
        url = f"{base}/invocations"
        bad = {"inputs": {**body["inputs"], "counts": [4, 9, 1]}}
        assert "counts: counts[1] = 9 is not in 1..4" in refused(url, bad, "counts")
        bad = {"inputs": {**body["inputs"], "counts": [4, 1.5, 1]}}
        assert "counts: expected 3 integers (one per image), got a float" in refused(
            url, bad, "counts"
        )
        bad = {"inputs": {**body["inputs"], "captions": [{"a": 1}, "a dog"]}}
        assert "captions[0] is not a string (dict)" in refused(url, bad, "captions")
        bad = {"inputs": {**body["inputs"], "features": [[["x"] * 16] * 4] * 3}}
        assert "features: expected numbers, got a value of type str" in refused(
            url, bad, "features"
        )
        n = 100_000  # 10^10 scores: 37 GB of float32 if it were allocated
        flood = {"features": [[[0.5] * 16]] * n, "counts": [1] * n, "captions": ["a dog"] * n}
        t0 = time.monotonic()
        message = refused(url, {"inputs": flood}, "captions")
        print(f"100,000 x 100,000 answered in {time.monotonic() - t0:.1f} s")
        assert "10000000000 scores, over the limit of 10000000" in message
        assert "SHAN_SERVE_MAX_SCORES" in message
        deep = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        status, raw = post_raw(url, deep)
        print(f"JSON nested 100,000 deep: HTTP {status}: {raw[:200]!r}")
        assert status == 400 and b"JSON nested deeper than 64 levels" in raw, raw[:300]
        status, raw = post_raw(url, b" " * (MAX_BODY + 1))
        print(f"a body of {MAX_BODY + 1:,} bytes: HTTP {status}: {raw[:200]!r}")
        assert status == 413 and f"over the limit of {MAX_BODY} bytes".encode() in raw, raw
        status, answer = post(url, body)  # a good request after them all
        print(f"then a good request: HTTP {status}, {sorted(answer.get('predictions', {}))}")
        assert status == 200
        np.testing.assert_allclose(
            np.array(answer["predictions"]["total"], np.float32), want["total"], atol=1e-5
        )
    console = (tmp_path / "serve.log").read_text()
    print(f"shan serve's console:\n{console}")
    assert "Traceback" not in console and "WARNING" not in console, console
    assert f"serving models:/shan-serve@champion at http://127.0.0.1:{port}" in console


def mlflow_serve(model_uri: str, port: int) -> list[str]:
    """``mlflow models serve`` of ``model_uri`` on 127.0.0.1:``port``, in this environment."""
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip


@contextmanager
def served(cmd: list[str], port: int, tmp: Path, env: dict | None = None) -> Iterator[str]:
    """The server ``cmd`` starts on 127.0.0.1:``port`` (its log in ``tmp/serve.log``): the base
    URL once it answers /ping; stopped by its process group after. MLflow runs ``uvicorn``
    from PATH: the one beside this Python; CPU float32, as the library's at 1e-5."""
    full = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    full.update({"CUDA_VISIBLE_DEVICES": "", **(env or {})})
    with open(tmp / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=full
        )
        base = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_for_ping(f"{base}/ping", proc)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{(tmp / 'serve.log').read_text()[-3000:]}") from None
            yield base
        finally:
            stop(proc)
    assert proc.poll() is not None


def log_first_stage_model(tmp: Path, uri: str, name: str) -> dict:
    """A tiny checkpoint with a first-stage head for a synthetic data set's vocabulary, logged
    as the MLflow model of a run and registered as ``name`` version 1 (alias ``champion``),
    and an index of the data set's test split built from that checkpoint."""
    import secrets

    from mlflow.tracking import MlflowClient

    from shan.data.format import load_vocab
    from shan.tracking import pyfunc

    base = untrained_on_synthetic(tmp, 12)
    ckpt = save_untrained_first_stage(tmp / "fs", load_vocab(str(base["data"])), seed=4)
    build_index(ckpt, base["data"], tmp / "index")
    c = MlflowClient(tracking_uri=uri)
    run_id = c.create_run(c.create_experiment(f"shan-serve-{secrets.token_hex(4)}")).info.run_id
    model_uri = pyfunc.log_model(uri, run_id, ckpt)
    assert pyfunc.register(uri, model_uri, name, run_id) == "1"
    c.set_registered_model_alias(name, "champion", "1")
    return {"ckpt": ckpt, "data": base["data"], "index": tmp / "index"}


def test_mlflow_models_serve_searches_the_index_beside_it(services, tmp_path):
    from shan.checkpoint import load_model
    from shan.fingerprint import file_digests
    from shan.index import open_index
    from shan.rerank import search_index

    uri = os.environ["MLFLOW_TRACKING_URI"]
    made = log_first_stage_model(tmp_path, uri, "shan-serve-search")
    captions = ["a red thing", "a blue dog on the grass"]
    loaded = load_model(made["ckpt"])
    index = open_index(str(made["index"]), model_files=file_digests(made["ckpt"]),
                       data_fingerprint=None, name="the test's")  # fmt: skip
    tokens = [loaded.vocab.encode(c, loaded.config.data.max_words) for c in captions]
    want = search_index(loaded.model, index, tokens, top=3, rerank=8)
    env = {"SHAN_SERVE_INDEX": str(made["index"])}
    port = free_port()
    with served(
        mlflow_serve("models:/shan-serve-search@champion", port), port, tmp_path, env
    ) as base:
        url = f"{base}/invocations"
        body = {"inputs": {"features": [], "counts": [], "captions": captions},
                "params": {"top": 3, "rerank": 8}}  # fmt: skip
        status, answer = post(url, body)
        print(f"search: HTTP {status}: {json.dumps(answer)[:300]}")
        assert status == 200, answer
        got = answer["predictions"]
        assert sorted(got) == sorted(["image_ids", *SCORES])
        for q, w in enumerate(want):
            assert got["image_ids"][q] == w.image_ids.tolist()
            for key in SCORES:
                np.testing.assert_allclose(got[key][q], w.scores[key], atol=1e-5)
        bad = {**body, "params": {"top": 5, "rerank": 3}}
        assert "rerank: 3 is smaller than top 5" in refused(url, bad, "rerank")
        req = scoring_request(r=4, dim=16)  # a scoring request is still answered
        status, answer = post(url, {"inputs": {k: np.asarray(v).tolist() for k, v in req.items()}})
        assert status == 200 and sorted(answer["predictions"]) == sorted(SCORES), answer
