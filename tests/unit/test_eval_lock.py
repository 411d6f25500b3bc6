"""The output folder's lock (``shan.eval.lock``), on a local folder: refused while held,
released with its process. The S3 lock object is ``tests/integration/test_eval_s3.py``'s."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shan.errors import JobError
from shan.eval.lock import LOCK_NAME, OutLock
from tests.helpers import ROOT


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
        "import sys, time; from shan.eval.lock import OutLock;"
        "l = OutLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True, env=env
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
