"""The type check is part of the suite: ``mypy`` over ``shan`` and ``shan_cli`` with the
``[tool.mypy]`` configuration of ``pyproject.toml``, as CI and the pre-commit hook run it.

mypy comes with the ``test`` extra: without it this test fails (it never skips), so a CI
image that lacks it cannot pass the suite unchecked. The cache is the repository's
``.mypy_cache`` (ignored by git): a first run reads the dependencies' types (about a minute),
later ones only what changed (seconds). That first minute is why it runs with the integration
tests, not in the unit suite.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_is_clean() -> None:
    if importlib.util.find_spec("mypy") is None:
        pytest.fail(
            "mypy is not installed: install the test extra (pip install -e '.[test]' -c "
            "constraints.txt), which CI does"
        )
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, f"mypy found problems (exit {proc.returncode}):\n{output}"
    assert "Success: no issues found" in output, output
