"""The project's layers, read from the source with ``ast`` (every import, those inside functions
included), and a limit on positional parameters.

Layers, lowest first:

- the library: every ``shan.*`` module but ``shan.train.*`` and ``shan.eval.*`` (promotion,
  tracking, runtime, scoring, data, features ... are library); it never parses a command line
  (no ``argparse``);
- ``shan.train.*`` and ``shan.eval.*``: build on the library, never import each other;
- ``shan.search.*``: builds on the library and on evaluation (its checkpoint loading, data
  fingerprint and attention picture); nothing below it imports it;
- ``shan_cli.*``: the command lines, may import any ``shan.*``;
- ``jobs/*.py``: shims that import ``shan_cli`` only.

Nothing in ``shan`` imports ``shan_cli``; nothing in ``shan``, ``shan_cli`` or ``jobs`` imports
``shan_stack`` (the local service stack, ``cluster/``).

The checks are functions of a source tree, so the tests also run them on a copy with planted
faults (the checker must see them).
"""

from __future__ import annotations

import ast
import functools
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("shan", "shan_cli")
MAX_POSITIONAL = 5


@dataclass
class Module:
    name: str  # dotted: shan.eval.job, jobs.train for a shim
    path: Path
    is_package: bool


def modules(root: Path) -> list[Module]:
    """Every module of ``shan/``, ``shan_cli/`` and ``jobs/`` under ``root``."""
    out = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            out.append(Module(".".join(parts), path, is_package))
    for path in sorted((root / "jobs").glob("*.py")):
        out.append(Module(f"jobs.{path.stem}", path, False))
    return out


@functools.cache
def _nodes(text: str, filename: str) -> tuple[list[ast.stmt], list[ast.stmt]]:
    imports, functions = [], []
    for node in ast.walk(ast.parse(text, filename=filename)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            imports.append(node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            functions.append(node)
    return imports, functions


def nodes(path: Path) -> tuple[list, list]:
    """(every import statement, every function definition) of ``path``, at any depth; a text
    seen before (the other files of a planted copy) is not parsed again."""
    return _nodes(path.read_text(), str(path.name))


def imports(module: Module, known: set[str]) -> list[tuple[int, str, str]]:
    """(line, imported module, the statement as written) of every import in ``module``.

    ``from a.b import c`` is ``a.b.c`` when that is a module of the tree, else ``a.b``;
    relative imports are made absolute."""
    package = module.name if module.is_package else module.name.rpartition(".")[0]
    out = []
    for node in nodes(module.path)[0]:
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node.lineno, alias.name, f"import {alias.name}"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            shown = "." * node.level + (node.module or "")
            for alias in node.names:
                full = f"{base}.{alias.name}" if base else alias.name
                target = full if full in known else base
                text = f"from {shown} import {alias.name}"
                out.append((node.lineno, target, text))
    return out


def within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer(name: str) -> str:
    """library, train, eval, search, cli, jobs, stack or other (stdlib, third party)."""
    for package, kind in (
        ("shan.train", "train"), ("shan.eval", "eval"), ("shan.search", "search"),
        ("shan", "library"),
    ):  # fmt: skip
        if within(name, package):
            return kind
    for package, kind in (("shan_cli", "cli"), ("jobs", "jobs"), ("shan_stack", "stack")):
        if within(name, package):
            return kind
    return "other"


def import_problem(source: str, target: str) -> str | None:
    """Why module ``source`` may not import ``target`` (None: it may)."""
    src, dst = layer(source), layer(target)
    if src in ("library", "train", "eval", "search"):
        if dst == "cli":
            return "the library never imports the command lines (shan_cli)"
        if dst == "stack":
            return "the library never imports the local service stack (shan_stack)"
        if within(target, "argparse"):
            return "the library never parses a command line (argparse)"
    if src == "library" and dst in ("train", "eval", "search"):
        return f"a library module imports shan.{dst}, a layer above it"
    if {src, dst} == {"train", "eval"}:
        return "shan.train and shan.eval never import each other"
    if dst == "search" and src in ("train", "eval"):
        return f"shan.{src} imports shan.search, a layer above it"
    if src == "search" and dst == "train":
        return "shan.search never imports shan.train"
    if src in ("cli", "jobs") and dst == "stack":
        return f"{'shan_cli' if src == 'cli' else 'jobs/'} never imports shan_stack"
    if src == "jobs" and dst != "cli" and target != "__future__":
        return "a job shim imports shan_cli only"
    return None


def layer_problems(root: Path) -> list[str]:
    """One line per import that breaks the layers: file, line, statement, rule."""
    mods = modules(root)
    known = {m.name for m in mods}
    problems = []
    for m in mods:
        for line, target, text in imports(m, known):
            why = import_problem(m.name, target)
            if why:
                problems.append(f"{m.path.relative_to(root)}:{line} ({m.name}): {text}: {why}")
    return problems


def positional_problems(root: Path) -> list[str]:
    """One line per function with more than MAX_POSITIONAL positional parameters
    (positional-only and regular ones, ``self``/``cls`` left out; keyword-only ones are free)."""
    problems = []
    for m in modules(root):
        if m.name.startswith("jobs."):
            continue
        for node in nodes(m.path)[1]:
            params = [a.arg for a in (*node.args.posonlyargs, *node.args.args)]
            if params and params[0] in ("self", "cls"):
                params = params[1:]
            if len(params) > MAX_POSITIONAL:
                problems.append(
                    f"{m.path.relative_to(root)}:{node.lineno} ({m.name}): {node.name}() takes "
                    f"{len(params)} positional parameters ({', '.join(params)}); at most "
                    f"{MAX_POSITIONAL}: make the rest keyword-only (after *)"
                )
    return problems


# -- the project ----------------------------------------------------------------------------------
def test_the_tree_has_modules_to_check():
    names = {m.name for m in modules(ROOT)}
    for name in ("shan.checkpoint", "shan.eval.job", "shan.train.worker", "shan_cli.main"):
        assert name in names
    assert any(n.startswith("jobs.") for n in names)


def test_layers():
    problems = layer_problems(ROOT)
    assert not problems, f"{len(problems)} import(s) break the layers:\n" + "\n".join(problems)


def test_at_most_five_positional_parameters():
    problems = positional_problems(ROOT)
    assert not problems, f"{len(problems)} function(s):\n" + "\n".join(problems)


# -- the checker itself, on a copy with planted faults --------------------------------------------
@pytest.fixture
def tree(tmp_path) -> Path:
    for package in (*PACKAGES, "jobs"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("*.pyc"))
    return tmp_path


def plant(path: Path, code: str) -> int:
    """Append ``code`` to ``path``; the line number where it starts."""
    text = path.read_text()
    if not text.endswith("\n"):
        text += "\n"
    path.write_text(text + code)
    return text.count("\n") + 1


def found(problems: list[str], where: str) -> list[str]:
    return [p for p in problems if p.startswith(where)]


@pytest.mark.parametrize(
    ("file", "code", "statement", "rule"),
    [
        ("shan/metrics.py", "def f():\n    from shan.train import worker\n",
         "from shan.train import worker", "a library module imports shan.train"),
        ("shan/promotion.py", "def f():\n    import shan.eval.job\n",
         "import shan.eval.job", "a library module imports shan.eval"),
        ("shan/tracking/runs.py", "from ..eval import tiles\n",
         "from ..eval import tiles", "a library module imports shan.eval"),
        ("shan/scoring.py", "from shan.search import query\n",
         "from shan.search import query", "a library module imports shan.search"),
        ("shan/eval/job.py", "from shan.search.index import image_index\n",
         "from shan.search.index import image_index", "imports shan.search, a layer above"),
        ("shan/search/job.py", "from shan.train import worker\n",
         "from shan.train import worker", "shan.search never imports shan.train"),
        ("shan/eval/outputs.py", "from shan.train.worker import lr_at\n",
         "from shan.train.worker import lr_at", "never import each other"),
        ("shan/train/driver.py", "from . import worker\nfrom ..eval import job\n",
         "from ..eval import job", "never import each other"),
        ("shan/runtime.py", "if True:\n    import argparse\n",
         "import argparse", "never parses a command line"),
        ("shan/eval/job.py", "from argparse import Namespace\n",
         "from argparse import Namespace", "never parses a command line"),
        ("shan/model.py", "import shan_cli\n", "import shan_cli", "never imports the command"),
        ("shan/data/fs.py", "from shan_stack import up\n",
         "from shan_stack import up", "local service stack"),
        ("shan_cli/train.py", "def g():\n    import shan_stack\n",
         "import shan_stack", "shan_cli never imports shan_stack"),
        ("jobs/train.py", "from shan.config import load_config\n",
         "from shan.config import load_config", "imports shan_cli only"),
        ("jobs/evaluate.py", "import shan_stack\n", "import shan_stack", "jobs/ never imports"),
    ],
)  # fmt: skip
def test_a_planted_import_is_found(tree, file, code, statement, rule):
    assert layer_problems(tree) == layer_problems(ROOT)  # the copy is the project
    start = plant(tree / file, code)
    new = sorted(set(layer_problems(tree)) - set(layer_problems(ROOT)))
    assert len(new) == 1, new
    line = start + code.splitlines().index(next(s for s in code.splitlines() if statement in s))
    assert new[0].startswith(f"{file}:{line} ") and statement in new[0] and rule in new[0], new


def test_allowed_imports_are_not_reported(tree):
    plant(tree / "shan_cli/evaluate.py", "import shan.train.driver\nfrom shan.eval import tiles\n")
    plant(tree / "shan/train/driver.py", "from shan import promotion\nfrom . import worker\n")
    plant(tree / "shan/eval/job.py", "import shan.tracking.runs\nfrom shan import runtime\n")
    plant(tree / "jobs/train.py", "from __future__ import annotations\nimport shan_cli.main\n")
    assert set(layer_problems(tree)) == set(layer_problems(ROOT))


def test_a_planted_signature_is_found(tree):
    before = set(positional_problems(tree))
    start = plant(
        tree / "shan/metrics.py",
        "def six(a, b, c, d, e, f):\n    pass\n\n\n"
        "def fine(a, b, c, d, e, *, f, g):\n    pass\n\n\n"
        "class K:\n    def method(self, a, b, c, d, e):\n        pass\n\n"
        "    @classmethod\n    def made(cls, a, b, c, d, e, f, /):\n        pass\n\n"
        "    def star(self, a, *args, **kw):\n        pass\n",
    )
    new = sorted(set(positional_problems(tree)) - before)
    assert len(new) == 2, new
    assert new[0].startswith(f"shan/metrics.py:{start} ") and "six() takes 6" in new[0]
    assert "made() takes 6 positional parameters (a, b, c, d, e, f)" in new[1]
