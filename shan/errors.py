"""The errors a user can cause (the jobs report them through ``shan_cli.run_job``).

A user error is one that would happen again if the job were retried unchanged (a bad value, a
damaged file, a non-finite loss): the jobs print it as one ``error: ...`` line per problem and
exit with status 2, and training ends at once instead of restarting its workers. The errors
cross from Ray workers to the driver by type: :func:`to_record` and :func:`from_record` turn
one into a small dict and back, through the registry :data:`USER_ERRORS`.

This module is the lowest layer of the library: it imports nothing from ``shan``, so every
module may raise these errors (``shan.config``, ``shan.data.format``, ``shan.data.fs``,
``shan.glove`` and ``shan.vocab`` re-export the ones they raise).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config file or override is malformed (unknown key, wrong type, bad value).

    It holds one or more problems (``problems``), one line each; ``str()`` joins them."""

    def __init__(self, *problems: str) -> None:
        super().__init__(*problems)
        self.problems = [str(p) for p in problems] or ["invalid config"]

    def __str__(self) -> str:
        return "\n".join(self.problems)


class DataError(ValueError):
    """A data set, or a source being converted, is malformed; the message names where."""


class StorageError(OSError):
    """A location cannot be reached or read."""


class GloveError(ValueError):
    """A GloVe file is missing or malformed."""


class VocabError(ValueError):
    """A vocabulary file is malformed."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or does not fit the data."""


class JobError(RuntimeError):
    """A job cannot go on (unreachable service, non-finite loss, ...); the message says why."""


USER_ERRORS = (
    ConfigError, DataError, StorageError, GloveError, VocabError, CheckpointError, JobError,
)  # fmt: skip

BY_NAME: dict[str, type[BaseException]] = {cls.__name__: cls for cls in USER_ERRORS}


def problems(e: BaseException) -> list[str]:
    """The problems of a user error, one each: a ConfigError's list, else its message."""
    lines = [str(p) for p in getattr(e, "problems", None) or [str(e)]]
    return [line for line in lines if line.strip()] or [type(e).__name__]


def to_record(e: BaseException) -> dict[str, str]:
    """``{"type": "DataError", "message": "..."}`` for a user error (to cross processes)."""
    return {"type": type(e).__name__, "message": "\n".join(problems(e))}


def from_record(record: dict) -> BaseException:
    """The user error a :func:`to_record` dict describes (JobError when the type is unknown)."""
    cls = BY_NAME.get(str(record.get("type")))
    message = str(record.get("message") or "")
    if cls is ConfigError:
        return ConfigError(*message.splitlines())
    if cls is None:
        return JobError(f"{record.get('type')}: {message}")
    return cls(message)
