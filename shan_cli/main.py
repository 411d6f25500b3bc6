"""``shan``: one command, a subcommand per job.

    shan train [--config demo] [--data PATH] [key=value ...]
    shan sweep SWEEP.yaml [--config demo] [--data PATH] [key=value ...]
    shan evaluate --model REF --data PATH [--out DIR] ...
    shan data {precomp,images,synthetic,validate} ...
    shan search --model REF --data PATH "a sentence" ...
    shan serve --model REF [--port 5001] [--index DEST]

``shan COMMAND --help`` describes each; ``jobs/<job>.py`` runs the same code by path (what
``ray job submit -- python jobs/train.py`` needs).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

import shan
from shan_cli import run_job

COMMANDS = {
    "train": ("shan_cli.train", "train SHAN on Ray Train, logged to MLflow"),
    "sweep": ("shan_cli.sweep", "sweep a config with Ray Tune: ASHA, MLflow parent and child runs"),
    "evaluate": ("shan_cli.evaluate", "score a split on Ray actors; metrics, outputs, promotion"),
    "data": ("shan_cli.prepare_data", "convert, extract, generate or validate a data set"),
    "search": ("shan_cli.search", "the images of a split that best match sentences"),
    "index": ("shan_cli.index", "build a split's image index for retrieve-then-rerank"),
    "serve": ("shan_cli.serve", "serve a trained model over HTTP (MLflow's scoring server)"),
}


def parser_factories() -> dict[str, Callable[[], argparse.ArgumentParser]]:
    """Each command's ``parser`` function (every command module has one): the parsers that
    tests/unit/test_cli.py walks (help on every flag, choices on every enumeration)."""
    return {name: importlib.import_module(mod).parser for name, (mod, _) in COMMANDS.items()}


def usage() -> str:
    lines = [__doc__.strip().splitlines()[0], "", "commands:"]
    lines += [f"  {name:<9} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "shan COMMAND --help for its options; shan --version"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``argv`` (default: the command line) to a job's ``main``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"shan {shan.__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"shan: unknown command {args[0]!r} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)  # fmt: skip
        return 2
    module = importlib.import_module(COMMANDS[args[0]][0])
    sys.argv[0] = f"shan {args[0]}"  # argparse's prog: usage lines read "shan train ..."
    return int(module.main(args[1:]) or 0)


def run() -> None:
    """The console entry point."""
    run_job(main)


if __name__ == "__main__":
    run()
