"""Project-level checks: lint with the project's ruff config, the README's Quickstart."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

RUFF = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")


def test_ruff_lint_and_format():
    r = subprocess.run([RUFF, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([RUFF, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_quickstart_has_two_commands_and_ci_runs_the_second():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / ".ci" / "quickstart.py")
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    first, second = quickstart.quickstart_commands((ROOT / "README.md").read_text())
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


def _layout_paths() -> set[str]:
    """Every backticked path of the README's layout section (``shan/x.py``, ``tests/unit/``)."""
    import re

    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- layout:begin", 1)[1].split("<!-- layout:end -->", 1)[0]
    paths = set()
    for row in re.findall(r"^\| `([^`]+)` \|(.*)\|$", block, re.M):
        top, what = row
        paths.add(top)
        if top.endswith("/"):  # files named in the description are inside the folder
            paths |= {top + name for name in re.findall(r"`([\w.]+\.py)`", what)}
    return paths


def test_readme_layout_matches_the_tree():
    """Each path the README's layout names exists, and every module of shan/ and shan_cli/ (and
    every folder at the top of the repository) is named, itself or through its folder's row."""
    listed = _layout_paths()
    missing = sorted(p for p in listed if not (ROOT / p).exists())
    assert not missing, f"README layout names paths that do not exist: {missing}"
    modules = [
        p.relative_to(ROOT).as_posix()
        for pkg in ("shan", "shan_cli")
        for p in (ROOT / pkg).rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    ]
    folders_whole = {p for p in listed if p.endswith("/") and p.count("/") == 1}  # jobs/, ...
    unnamed = [
        m for m in modules
        if m not in listed and not any(m.startswith(f) for f in folders_whole if f != "shan/")
    ]  # fmt: skip
    assert not unnamed, f"README layout does not name: {unnamed}"
    tops = {p.name + "/" for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    tops -= {"checkpoints/", "evaluations/", "searches/", "build/", "dist/", "mlruns/"}  # outputs
    tops = {t for t in tops if not t.endswith(".egg-info/") and "venv" not in t}
    assert tops <= {p.split("/")[0] + "/" for p in listed}, tops
