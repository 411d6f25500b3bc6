"""The command lines of the project's jobs: ``shan train``, ``shan evaluate``, ``shan data``.

This package parses command lines and calls the library (``shan``), which never does. Each job
module has ``main(argv) -> int`` and runs under :func:`run_job`, whose exit status
:func:`exit_status` gives; ``jobs/*.py`` are shims that ``ray job submit`` runs by path.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from shan.data.fs import out_of_space, write_error
from shan.errors import USER_ERRORS, problems


def run_job(main: Callable[[], int | None]) -> None:
    """Run ``main`` as a process: :func:`exit_status` is the process's exit status. In a log
    (stderr not a terminal) MLflow's download bars are off: their carriage returns would fill
    it (shan.progress prints plain lines there)."""
    if not sys.stderr.isatty():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    sys.exit(exit_status(main))


def exit_status(main: Callable[[], int | None]) -> int:
    """Call ``main``; its status (None: 0). A user error prints one ``error: ...`` line per
    problem (:func:`print_user_error`) and is status 2; an interrupt is 130."""
    try:
        return main() or 0
    except USER_ERRORS as e:
        print_user_error(e)
        return 2
    except MemoryError as e:  # an allocation no bound caught: one line, not a traceback
        print(f"error: out of memory{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk met by a writer that does not name its destination
        if not out_of_space(e):
            raise
        print(f"error: {write_error(e, e.filename or 'a file')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def print_user_error(e: BaseException) -> None:
    """One ``error: ...`` line per problem of ``e`` on stderr; a problem's further lines
    follow, indented."""
    for problem in problems(e):
        first, *rest = problem.splitlines() or [""]
        print(f"error: {first}", *(f"  {line}" for line in rest), sep="\n", file=sys.stderr)
