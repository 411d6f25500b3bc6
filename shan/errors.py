"""The errors a user can cause, and the one way the jobs report them."""

from __future__ import annotations

import sys
from collections.abc import Callable

from shan.config import ConfigError
from shan.data.format import DataError
from shan.data.fs import StorageError
from shan.glove import GloveError
from shan.vocab import VocabError


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the data."""


class JobError(RuntimeError):
    """A job cannot go on (unreachable service, non-finite loss, ...); the message says why."""


USER_ERRORS = (
    ConfigError, DataError, StorageError, GloveError, VocabError, CheckpointError, JobError,
)  # fmt: skip


def run_job(main: Callable[[], int | None]) -> None:
    """Run ``main``; a user error prints one ``error: ...`` line and exits with status 2."""
    try:
        code = main()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
