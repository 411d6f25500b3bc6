"""Project-level checks: lint with the project's ruff config, the README's Quickstart."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUFF = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")


def test_ruff_lint_and_format():
    r = subprocess.run([RUFF, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([RUFF, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_quickstart_has_two_commands_and_ci_runs_the_second():
    sys.path.insert(0, str(ROOT / ".ci"))
    from quickstart import quickstart_commands

    first, second = quickstart_commands((ROOT / "README.md").read_text())
    assert "jobs/train.py" in first and "pytest" in second
    assert "pip install" in first and "pip install" in second
    assert "quickstart.py 2" in (ROOT / ".ci" / "run").read_text()


def test_readme_library_example_runs():
    import re

    text = (ROOT / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert tuple(scope["sims"]["g2g"].shape) == (3, 2)
    assert scope["loss"].ndim == 0 and "rsum" in scope["metrics"]
