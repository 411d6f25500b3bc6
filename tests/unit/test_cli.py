"""The command lines' package (``shan_cli``): a user error is one ``error:`` line per problem
and exit status 2; ``shan`` dispatches to the jobs. In this process: the jobs' subprocess runs
are the integration tests'."""

from __future__ import annotations

import pytest

from shan.config import ConfigError
from shan.errors import CheckpointError
from shan_cli import run_job


def test_run_job_prints_one_line_per_problem(capsys):
    def main():
        raise ConfigError("optim.lr must be > 0 and finite, got -1.0", "seed must be >= 0")

    with pytest.raises(SystemExit) as info:
        run_job(main)
    assert info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: optim.lr must be > 0 and finite, got -1.0", "error: seed must be >= 0"]

    def two_lines():
        raise CheckpointError("bad checkpoint\ndetail")

    with pytest.raises(SystemExit):
        run_job(two_lines)
    assert capsys.readouterr().err.splitlines() == ["error: bad checkpoint", "  detail"]


# -- shan COMMAND ----------------------------------------------------------------------------------
def test_shan_lists_its_commands_and_version(capsys):
    import shan
    from shan_cli.main import COMMANDS, main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in COMMANDS) and set(COMMANDS) == {
        "train",
        "evaluate",
        "data",
        "search",
    }
    assert main([]) == 2  # no command: the usage, and a failing status
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"shan {shan.__version__}"
    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "evaluate", "data", "search"])
def test_each_command_is_its_jobs_parser(command, capsys, monkeypatch):
    import sys

    from shan_cli.main import main

    monkeypatch.setattr(sys, "argv", ["shan"])  # main names the program after the command
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: shan {command}")


def test_the_job_shims_run_the_packages_main():
    """``jobs/<job>.py`` (what ``ray job submit`` runs by path) import their ``main`` from
    ``shan_cli``; the code lives there."""
    import ast

    from tests.helpers import ROOT

    for job in ("train", "evaluate", "prepare_data", "search"):
        tree = ast.parse((ROOT / "jobs" / f"{job}.py").read_text())
        imports = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                   for a in n.names}  # fmt: skip
        assert (f"shan_cli.{job}", "main") in imports and ("shan_cli", "run_job") in imports
