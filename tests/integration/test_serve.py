"""The registered model served by MLflow's scoring server (``mlflow models serve --env-manager
local``) on 127.0.0.1: ``/invocations`` answers the four score matrices of the library's scorer,
and a bad request gets a 400 naming the field. The model is an untrained tiny checkpoint logged
into the session's MLflow server (no training)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from shan_stack import free_port

from shan.model import SCORES
from tests.helpers import library_scores, log_tiny_model, scoring_request


def post(url: str, body: dict) -> tuple[int, dict]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


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


def test_mlflow_models_serve_scores_like_the_library(services, tmp_path):
    uri = os.environ["MLFLOW_TRACKING_URI"]
    logged = log_tiny_model(tmp_path, name="shan-serve", alias="champion", uri=uri)
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/shan-serve@champion",
           "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (closed in finally)
    # MLflow runs `uvicorn` from PATH: the one beside this Python
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU float32, comparable to the library's at 1e-5
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
    )
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_for_ping(f"{base}/ping", proc)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{(tmp_path / 'serve.log').read_text()[-3000:]}") from None
        req = scoring_request()
        body = {"inputs": {k: np.asarray(v).tolist() for k, v in req.items()}}
        status, answer = post(f"{base}/invocations", body)
        assert status == 200, answer
        got, want = answer["predictions"], library_scores(logged["ckpt"], req)
        assert sorted(got) == sorted(SCORES)
        for key in SCORES:
            np.testing.assert_allclose(np.array(got[key], np.float32), want[key], atol=1e-5)
        body["inputs"]["counts"] = [4, 9, 1]
        status, answer = post(f"{base}/invocations", body)
        assert status == 400 and "counts: counts[1] = 9 is not in 1..4" in answer["message"]
    finally:
        stop(proc)
        log.close()
    assert proc.poll() is not None
