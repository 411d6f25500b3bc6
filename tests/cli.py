"""Running the jobs through their real command line, and the bad-input case list.

Every bad input the project promises to catch is a :class:`Case` in a ``CASES`` list of a
``tests/integration/test_bad_inputs_*.py`` module; ``tests/reliability.py`` turns the lists into
the reliability table of docs/reliability.md. The tests run each case as a user would: through
the job's ``main`` in this process (:func:`run_main`: the same exit status and ``error:`` lines
as the shim, seconds faster), or, for the cases marked ``subprocess``, as a subprocess of
``jobs/*.py`` (:func:`run_job`: the real shim, console and Ray).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import os
import re
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

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
    return _run([str(ROOT / "jobs" / f"{job}.py"), *args], env=env, cwd=cwd, timeout=timeout)


def run_module(module: str, *args: str, env: dict | None = None, timeout: float = 300) -> Result:
    """``python -m MODULE ARGS`` in a subprocess from the repository root (a test's wrapper
    around a job, e.g. ``tests.integration.killed_conversion``)."""
    return _run(["-m", module, *args], env=env, cwd=ROOT, timeout=timeout)


def _run(argv: list[str], *, env: dict | None, cwd: Path | None, timeout: float) -> Result:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    r = subprocess.run(
        [sys.executable, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env=full_env,
    )
    return Result(r.returncode, r.stdout, r.stderr)


class RayStarted(BaseException):
    """A job run by :func:`run_main` reached for Ray (a BaseException: no handler of the job's
    turns it into something else)."""


@contextlib.contextmanager
def no_ray() -> Iterator[None]:
    """Ray unavailable in the block: ``ray.init`` (Ray's own and its automatic start) raises
    :class:`RayStarted`, and a connection this process already has is hidden."""
    import ray

    def refuse(*args, **kwargs):
        raise RayStarted("the job started Ray")

    saved = ray.init, ray.is_initialized
    ray.init, ray.is_initialized = refuse, lambda: False
    try:
        yield
    finally:
        ray.init, ray.is_initialized = saved


@contextlib.contextmanager
def process_state(job: str, args: tuple[str, ...], env: dict, cwd: Path | None) -> Iterator[None]:
    """This process as ``python jobs/<job>.py ARGS`` would start, for the block: ``sys.argv``
    (argparse's ``prog``), the environment with ``env`` applied (None: removed), the working
    directory; all of it, warning filters and torch's thread count as they were after."""
    saved_argv, saved_env, saved_cwd = sys.argv[:], dict(os.environ), os.getcwd()
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch else None
    sys.argv = [str(ROOT / "jobs" / f"{job}.py"), *args]
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        os.chdir(cwd or ROOT)
        with warnings.catch_warnings():
            yield
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        if torch and threads:
            torch.set_num_threads(threads)


def run_main(job: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> Result:
    """``python jobs/<job>.py ARGS`` in this process: the job's ``main`` under
    ``shan_cli.exit_status``, the shim's exit path, its stdout and stderr captured. ``env`` and
    ``cwd`` as :func:`run_job` takes them, undone after. A traceback is exit 1 with the
    traceback on stderr, as Python gives it; a job that reaches for Ray fails the test (such a
    case runs as a subprocess: ``Case(subprocess=True)``)."""
    from shan_cli import exit_status

    main = importlib.import_module(f"shan_cli.{job}").main
    out, err = io.StringIO(), io.StringIO()
    with (
        process_state(job, args, env or {}, cwd),
        no_ray(),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
    ):
        try:
            code = exit_status(lambda: main(list(args)))
        except SystemExit as e:  # argparse's exit, or sys.exit
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except RayStarted:
            pytest.fail(f"jobs/{job}.py {' '.join(args)} started Ray: run it as a subprocess"
                        f"\n--- stdout ---\n{out.getvalue()[-3000:]}"
                        f"\n--- stderr ---\n{err.getvalue()[-3000:]}")  # fmt: skip
        except Exception:
            traceback.print_exc()
            code = 1
    return Result(int(code), out.getvalue(), err.getvalue())


def run_case(case: Case, *args: str, env: dict | None = None, cwd: Path | None = None,
             timeout: float = 300) -> Result:  # fmt: skip
    """A bad-input case's job: in this process, or as a subprocess for a ``subprocess`` case."""
    if case.subprocess:
        return run_job(case.job, *args, env=env, cwd=cwd, timeout=timeout)
    return run_main(case.job, *args, env=env, cwd=cwd)


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
    arguments; the error line must contain every string of ``names``. ``subprocess``: run it
    as ``python jobs/<job>.py`` (a case that starts Ray, or one that keeps the shim tested);
    the others run through the job's ``main`` in the test process (:func:`run_case`)."""

    id: str
    job: str  # prepare_data, train, evaluate or search
    input: str  # the bad input, as the table of docs/reliability.md says it
    argv: Callable[[Path], list[str]]
    names: tuple[str, ...]
    lines: int = 1
    env: dict = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # fixtures the case needs, e.g. ("s3",)
    subprocess: bool = False
