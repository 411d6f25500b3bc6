"""Project-level checks: lint with the project's ruff config, the README (Quickstart, commands,
layout, length) and the links of the docs."""

import argparse
import importlib.util
import re
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


def test_library_page_example_runs():
    text = (ROOT / "docs" / "library.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, flags=re.S).group(1)
    scope: dict = {}
    exec(compile(block, "docs/library.md", "exec"), scope)
    assert tuple(scope["sims"]["g2g"].shape) == (3, 2)
    assert scope["loss"].ndim == 0 and "rsum" in scope["metrics"]


def _layout_paths() -> set[str]:
    """Every backticked path of the README's layout section (``shan/x.py``, ``tests/unit/``)."""
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


README_MAX_LINES = 250  # read in five minutes; the rest lives in docs/


def test_readme_is_short_and_lists_every_command():
    """Each ``shan`` command, each ``shan data`` subcommand and each ``jobs/*.py`` shim has its
    row in the README's command table; the README stays at most 250 lines."""
    from shan_cli.main import parser_factories

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    table = text.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    parsers = parser_factories()
    for name, make in parsers.items():
        subs = [a for a in make()._actions if isinstance(a, argparse._SubParsersAction)]
        commands = [f"shan {name} {sub}" for a in subs for sub in a.choices] or [f"shan {name}"]
        for command in commands:
            assert any(row.startswith(f"| `{command} ") for row in rows), command
    for shim in sorted((ROOT / "jobs").glob("*.py")):
        assert f"`jobs/{shim.name}`" in table, shim.name


def _doc_pages() -> list[Path]:
    """The project's markdown pages: README.md, CONTRIBUTING.md, docs/*.md, folder READMEs."""
    pages = [*ROOT.glob("*.md"), *(ROOT / "docs").glob("*.md"), *ROOT.glob("*/README.md")]
    return sorted(p for p in pages if "venv" not in p.parts[-2])


def _prose(text: str) -> str:
    """``text`` less fenced code blocks and inline code (where a ``](`` or ``#`` is not
    markdown)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of ``page``'s headings: lower case, punctuation dropped, spaces to
    hyphens, ``-1``, ``-2`` ... for repeats."""
    seen: dict[str, int] = {}
    for title in re.findall(r"^#{1,6} +(.+?) *$", re.sub(r"^```.*?^```", "", page.read_text(),
                                                          flags=re.S | re.M), re.M):  # fmt: skip
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        seen[slug] = seen.get(slug, -1) + 1
        if seen[slug]:
            seen[f"{slug}-{seen[slug]}"] = 0
    return set(seen)


def test_every_relative_link_of_the_docs_resolves():
    """Each relative markdown link (and picture) of the pages points to a file or folder that
    exists, and its ``#anchor``, if any, to a heading of that page."""
    broken = []
    for page in _doc_pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", _prose(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert len(_doc_pages()) >= 10
    assert not broken, broken


def test_the_data_command_has_one_name():
    """The docs call it ``shan data``; ``prepare_data`` appears only as the shim's path
    (``jobs/prepare_data.py``, for ray job submit) or its module's file in the layout."""
    for page in _doc_pages():
        text = page.read_text().replace("`prepare_data.py` (`shan data`)", "")
        others = [m for m in re.findall(r"[\w/]*prepare_data[\w.]*", text)
                  if m != "jobs/prepare_data.py"]  # fmt: skip
        assert not others, f"{page.relative_to(ROOT)}: {others}"
