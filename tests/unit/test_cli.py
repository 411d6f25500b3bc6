"""The command lines' package (``shan_cli``): a user error is one ``error:`` line per problem
and exit status 2 (a MemoryError and a full disk too); ``shan`` dispatches to the jobs. In
this process: the jobs' subprocess runs are the integration tests'."""

from __future__ import annotations

import errno

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
        "index",
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


# -- the parsers: help on every flag, choices on every enumeration, no abbreviations -------------
# options that take a text default but no fixed set of values (anything else with a text
# default is an enumeration and must have choices)
FREE_TEXT = {
    "train --config": "a packaged config or a YAML file",
    "evaluate --split": "a split of the data set",
    "search --cache": "a folder for the image indexes",
    "index build --split": "a split of the data set",
    "index head --split": "a split of the data set",
    "data images --weights": "a .pth file or 'random'",
}


def walk(name: str, parser) -> list[tuple[str, object, object]]:
    """``(command, parser, action)`` of every action of ``parser`` and its subcommands."""
    import argparse

    out = []
    for action in parser._actions:
        out.append((name, parser, action))
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                out += walk(f"{name} {sub}", subparser)
    return out


def all_actions():
    from shan_cli.main import parser_factories

    return [row for name, make in parser_factories().items() for row in walk(name, make())]


def test_every_flag_has_help_and_every_enumeration_choices():
    import argparse

    seen_free = set()
    for command, parser, action in all_actions():
        flag = f"{command} {(action.option_strings or [action.dest])[-1]}"
        assert parser.allow_abbrev is False, f"{command}: abbreviations are allowed"
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help and action.help.strip(), f"{flag} has no help"
        if action.choices is not None and action.default is not None:
            assert action.default in action.choices, f"{flag}: default not among the choices"
        takes_text = action.type is None and action.nargs is None and action.const is None
        if takes_text and isinstance(action.default, str) and action.choices is None:
            assert flag in FREE_TEXT, f"{flag}: an enumeration without choices?"
            seen_free.add(flag)
    assert seen_free == set(FREE_TEXT), "FREE_TEXT names an option that is gone"


def test_the_walk_finds_subcommands_and_enumerations():
    """The walk reaches the data subcommands, and the known enumerations have their choices
    (from the library's own tuples where it has one)."""
    from shan.data.format import DTYPES
    from shan.eval import PROTOCOLS
    from shan.extract import ON_BAD
    from shan.features import EXTRACTORS
    from shan.features.resnet import ARCHS
    from shan.index.ann import KINDS

    choices = {
        f"{c} {a.option_strings[-1]}": tuple(a.choices)
        for c, _, a in all_actions()
        if a.option_strings and a.choices is not None
    }
    assert choices == {
        "evaluate --protocol": PROTOCOLS,
        "data precomp --dtype": tuple(DTYPES),
        "data images --dtype": tuple(DTYPES),
        "data images --extractor": EXTRACTORS,
        "data images --arch": tuple(ARCHS),
        "data images --on-bad-image": ON_BAD,
        "index build --kind": KINDS,
    }


@pytest.mark.parametrize(
    "command, argv",
    [
        ("train", ["--work", "2"]),
        ("evaluate", ["--model", "m", "--data", "d", "--actor", "2"]),
        ("data", ["synthetic", "--out", "x", "--tra", "5"]),
        ("index", ["build", "--model", "m", "--data", "d", "--out", "o", "--act", "2"]),
    ],
)
def test_abbreviated_flags_are_refused(command, argv, capsys):
    from shan_cli.main import parser_factories

    with pytest.raises(SystemExit) as info:
        parser_factories()[command]().parse_args(argv)
    assert info.value.code == 2
    assert "unrecognized arguments" in capsys.readouterr().err


# -- shan train: --help lists the config keys; --print-config ------------------------------------
def test_train_help_lists_every_config_key(capsys):
    from shan.config import key_fields
    from shan_cli.train import main

    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    epilog = out[out.index("config keys") :].splitlines()
    for key, _ in key_fields():
        assert any(line.startswith(f"  {key} ") for line in epilog), key
    (affinity,) = [line for line in epilog if line.startswith("  model.affinity ")]
    assert affinity.split()[1:4] == ["{cosine,dot}", "=", "cosine"]
    (workers,) = [line for line in epilog if line.startswith("  scaling.num_workers ")]
    assert workers.split()[1:4] == ["int|[int,int]|null", "=", "null"]
    assert "--workers MIN-MAX" in out and "[min, max]" in out


@pytest.fixture
def no_training(monkeypatch):
    """Importing the training driver (or Ray, or MLflow) fails: --print-config never gets there."""
    import sys

    for module in ("shan.train.driver", "ray", "mlflow"):
        monkeypatch.setitem(sys.modules, module, None)


def test_print_config_prints_the_resolved_config(no_training, tmp_path, capsys):
    import yaml

    from shan.config import config_from_dict
    from shan_cli.train import main

    extra = tmp_path / "mine.yaml"
    extra.write_text("name: mine\nmodel:\n  d: 48\noptim:\n  lr: 0.01\n")
    argv = ["--config", str(extra), "--print-config", "optim.lr=0.5", "--workers", "3"]
    argv += ["--data", "s3://b/f30k", "--name", "2024", "loss.negatives=all"]
    assert main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = config_from_dict(printed)  # a config file the job takes back
    assert (cfg.name, cfg.model.d, cfg.optim.lr, cfg.loss.negatives) == ("mine", 48, 0.5, "all")
    assert (cfg.scaling.num_workers, cfg.data.path, cfg.tracking.run_name) == (
        3,
        "s3://b/f30k",
        "2024",
    )
    assert list(printed) == ["name", "seed", "model", "loss", "optim", "data", "scaling",
                             "tracking"]  # fmt: skip


def test_workers_min_max_is_an_elastic_range(no_training, capsys):
    """``--workers 1-2`` sets ``scaling.num_workers: [1, 2]``; ``--workers 2`` stays a number;
    a bad range is argparse's one line (exit 2), nothing printed on stdout."""
    import yaml

    from shan_cli.train import main

    for flag, want in (("1-2", [1, 2]), ("2", 2), (" 3-3", [3, 3])):
        assert main(["--print-config", "--workers", flag]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["scaling"]["num_workers"] == want
    for flag, why in (("2-1", "expected 1 <= MIN <= MAX, got 2-1"), ("0-2", "1 <= MIN"),
                      ("1-x", "expected N or MIN-MAX (whole numbers), got '1-x'"),
                      ("0", "must be at least 1, got 0")):  # fmt: skip
        with pytest.raises(SystemExit) as info:
            main(["--print-config", "--workers", flag])
        out, err = capsys.readouterr()
        assert info.value.code == 2 and out == "" and why in err.splitlines()[-1], err


def test_print_config_with_bad_values_is_the_usual_errors(no_training, capsys):
    from shan_cli.train import main

    with pytest.raises(SystemExit) as info:
        run_job(lambda: main(["--print-config", "model.affinity=dots", "optim.lr=-1"]))
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "error: model.affinity must be one of cosine, dot, got 'dots'",
        "error: optim.lr must be > 0 and finite, got -1.0",
    ]


def test_train_flags_set_the_keys_their_help_names():
    from shan.config import key_fields
    from shan_cli.train import FLAG_KEYS, parser

    keys = {k for k, _ in key_fields()}
    helps = {a.dest: a.help for a in parser()._actions}
    for flag, key in FLAG_KEYS:
        assert key in keys and key in helps[flag], (flag, key)


@pytest.mark.parametrize("tty", [False, True])
def test_mlflow_download_bars_are_off_in_a_log_only(monkeypatch, tty):
    import io
    import os

    from shan_cli import run_job

    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "x")  # restored afterwards
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    monkeypatch.setattr("sys.stderr", Stream())
    seen = {}

    def main() -> int:
        seen["bar"] = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        return 0

    with pytest.raises(SystemExit) as e:
        run_job(main)
    assert e.value.code == 0
    assert seen["bar"] == (None if tty else "false")


def test_an_unbounded_allocation_is_one_line_not_a_traceback(capsys):
    def main():
        raise MemoryError

    with pytest.raises(SystemExit) as info:
        run_job(main)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: out of memory"]


def test_a_full_disk_no_writer_named_is_one_line_naming_the_file(capsys):
    def main():
        raise OSError(errno.ENOSPC, "No space left on device", "/mnt/full/out.json")

    with pytest.raises(SystemExit) as info:
        run_job(main)
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: cannot write /mnt/full/out.json: no space left on device (errno 28)"
    ]

    def other():
        raise OSError(errno.EIO, "I/O error")

    with pytest.raises(OSError, match="I/O error"):  # not ours to hide: its traceback stays
        run_job(other)
