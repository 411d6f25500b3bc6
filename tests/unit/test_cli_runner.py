"""The bad-input tests' in-process runner (``tests.cli.run_main``) gives what a user of
``python jobs/<job>.py`` sees, and leaves this process as it found it."""

from __future__ import annotations

import os
import sys

import pytest

from tests.cli import assert_user_error, run_main
from tests.helpers import TINY


def test_a_user_error_is_one_line_and_exit_2_and_the_process_is_restored(tmp_path):
    argv, cwd = sys.argv[:], os.getcwd()
    os.environ.pop("SHAN_TEST_RUNNER", None)
    r = run_main("train", "--config", TINY, "optim.lr=-1", "--print-config",
                 env={"SHAN_TEST_RUNNER": "1", "HOME": None}, cwd=tmp_path)  # fmt: skip
    assert_user_error(r, "optim.lr", "-1.0")
    assert r.stdout == ""
    assert (sys.argv, os.getcwd()) == (argv, cwd)
    assert "SHAN_TEST_RUNNER" not in os.environ and "HOME" in os.environ


def test_argparse_errors_name_the_shim_and_a_success_is_0(capsys):
    r = run_main("train", "--workers", "0")
    assert_user_error(r, "train.py: error: argument --workers")
    r = run_main("train", "--config", TINY, "--print-config")
    assert r.returncode == 0 and "name: tiny" in r.stdout, r
    assert capsys.readouterr() == ("", "")  # all of it in the result, none on the console


def test_a_traceback_is_exit_1_with_the_traceback(monkeypatch):
    def crash(argv):
        raise ValueError("a bug")

    monkeypatch.setattr("shan_cli.train.main", crash)
    r = run_main("train")
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "ValueError: a bug" in r.stderr


def test_a_job_that_starts_ray_fails_the_test(monkeypatch):
    import ray

    from shan.runtime import init_ray

    connected = ray.is_initialized()  # the whole suite may hold the session's connection
    monkeypatch.setattr("shan_cli.train.main", lambda argv: init_ray(lambda s: None))
    with pytest.raises(pytest.fail.Exception, match="started Ray: run it as a subprocess"):
        run_main("train", env={"RAY_ADDRESS": None})
    assert ray.is_initialized() == connected  # no Ray started, an existing connection kept
    assert ray.init is not None and ray.is_initialized.__module__.startswith("ray")
