"""The standard MLflow tags of a run: where it came from and who started it.

``mlflow.source.name`` is the entry point (``jobs/train.py``, ``shan train``),
``mlflow.source.type`` is ``JOB`` for a job submitted to a cluster (``RAY_ADDRESS`` set) and
``LOCAL`` otherwise, ``mlflow.source.git.commit`` the commit of the code: ``SHAN_GIT_COMMIT``
when set (``ray job submit --working-dir`` uploads no ``.git``: the submitter sets it, see
cluster/README.md), else ``git rev-parse HEAD`` of the working directory, else no tag.
"""

from __future__ import annotations

import getpass
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from shan.runtime import on_cluster

GIT_COMMIT_ENV = "SHAN_GIT_COMMIT"


def source_name(default: str) -> str:
    """The entry point this process runs: a script under the working directory by its
    relative path (``jobs/train.py``), the ``shan`` command as ``shan <command>``, else
    ``default`` (a test runner, an interactive session)."""
    argv = sys.argv
    first = Path(argv[0]) if argv and argv[0] else None
    if first is None:
        return default
    if re.fullmatch(r"shan [a-z]+", argv[0]):  # shan_cli.main renames it (argparse's prog)
        return argv[0]
    cli = first.name == "shan" or (first.name == "__main__.py" and first.parent.name == "shan_cli")
    if cli and len(argv) > 1:
        return f"shan {argv[1]}"
    if first.suffix == ".py":
        try:
            return first.resolve().relative_to(Path.cwd().resolve()).as_posix()
        except ValueError:
            pass
    return default


def git_commit(cwd: str | None = None) -> str | None:
    """``SHAN_GIT_COMMIT``, else the commit checked out in ``cwd`` (the working directory),
    else None (no git, or not a checkout)."""
    given = os.environ.get(GIT_COMMIT_ENV, "").strip()
    if given:
        return given
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = r.stdout.strip()
    ok = r.returncode == 0 and len(commit) in (40, 64)
    return commit if ok and all(ch in "0123456789abcdef" for ch in commit) else None


def user() -> str:
    """Who runs this process (``getpass.getuser()``), ``unknown`` when nobody can be named."""
    try:
        return getpass.getuser()
    except (OSError, KeyError, ImportError):
        return "unknown"


def source_tags(entry_point: str, default_source: str) -> dict[str, str]:
    """MLflow's standard tags for a run of ``entry_point`` (``train``, ``evaluate``) started
    from ``default_source`` when :func:`source_name` cannot tell."""
    from mlflow.entities import SourceType
    from mlflow.utils import mlflow_tags as t

    kind = SourceType.JOB if on_cluster() else SourceType.LOCAL
    tags = {
        t.MLFLOW_SOURCE_NAME: source_name(default_source),
        t.MLFLOW_SOURCE_TYPE: SourceType.to_string(kind),
        t.MLFLOW_USER: user(),
        t.MLFLOW_PROJECT_ENTRY_POINT: entry_point,
    }
    commit = git_commit()
    if commit:
        tags[t.MLFLOW_GIT_COMMIT] = commit
    return tags


def missing(tags: Mapping[str, str], existing: Mapping[str, str]) -> dict[str, str]:
    """The ``tags`` that ``existing`` does not hold: a tag already there (set by the user or an
    earlier training of the run) is never replaced."""
    return {k: v for k, v in tags.items() if k not in existing}
