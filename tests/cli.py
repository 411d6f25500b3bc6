"""Running the jobs through their real command line, and the bad-input case list.

Every bad input the project promises to catch is a :class:`Case` in a ``CASES`` list of a
``tests/integration/test_bad_inputs_*.py`` module; the tests run each one as a user would (a
subprocess of ``jobs/*.py``, the shims of ``shan_cli``) and ``tests/reliability.py`` turns the
lists into the reliability table of docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ERROR_LINE = re.compile(r"^(\S+( \S+)?: )?error: ")
# A line Ray forwards from one of its processes: ``(Name pid=N)``, ``(pid=gcs_server)`` or
# ``(Name pid=N, ip=A)``, maybe in colour. Ray's own; it may come after the job's last line.
RAY_FORWARDED = re.compile(r"^(?:\x1b\[[0-9;]*m)?\([^\n]*?pid=\w+(?:, ip=[\d.]+)?\)")


def driver_lines(text: str) -> list[str]:
    """The job's own lines of ``text``: without those Ray forwards from its processes (a Ray
    Data thread may log a traceback as the run shuts down, the GCS an RPC it could not make)."""
    return [line for line in text.splitlines() if not RAY_FORWARDED.match(line)]


def last_line(text: str) -> str:
    """The job's own last non-empty line of ``text``."""
    lines = [line for line in driver_lines(text) if line.strip()]
    return lines[-1].strip() if lines else ""


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error_lines(self) -> list[str]:
        """``error: ...`` lines: the jobs' own, and argparse's ``PROG: error: ...``."""
        return [line for line in self.stderr.splitlines() if ERROR_LINE.match(line)]


def run_job(
    job: str, *args: str, env: dict | None = None, cwd: Path | None = None, timeout: float = 300
) -> Result:
    """``python jobs/<job>.py ARGS`` in a subprocess; ``env`` is added to this process's."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    r = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / f"{job}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env=full_env,
    )
    return Result(r.returncode, r.stdout, r.stderr)


def assert_user_error(r: Result, *fragments: str, lines: int = 1) -> None:
    """Exit 2, no traceback, exactly ``lines`` ``error: ...`` lines, which together contain every
    fragment (the file, key or value at fault)."""
    context = f"\n--- stdout ---\n{r.stdout[-3000:]}\n--- stderr ---\n{r.stderr[-3000:]}"
    assert r.returncode == 2, f"exit {r.returncode}, expected 2{context}"
    assert "Traceback" not in r.stdout + r.stderr, f"a traceback{context}"
    errors = r.error_lines
    assert len(errors) == lines, f"{len(errors)} error lines, expected {lines}{context}"
    text = "\n".join(errors)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in the error{context}"


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder`` (empty if it does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@dataclass
class Case:
    """One bad input, tried through the real command line.

    ``argv(tmp)`` makes whatever files the case needs under ``tmp`` and returns the job's
    arguments; the error line must contain every string of ``names``."""

    id: str
    job: str  # prepare_data, train, evaluate or search
    input: str  # the bad input, as the table of docs/reliability.md says it
    argv: Callable[[Path], list[str]]
    names: tuple[str, ...]
    lines: int = 1
    env: dict = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # fixtures the case needs, e.g. ("s3",)
