"""The project's layers, read from the source with ``ast`` (every import: at module level,
inside functions and under ``TYPE_CHECKING``), and a limit on positional parameters.

The layers, lowest first (:data:`LAYERS`); a module may import modules of its own layer or of a
lower one, never of a higher one:

0. ``shan.errors``: the user errors; imports nothing from ``shan``;
1. ``shan.config``, ``shan.vocab``, ``shan.glove``, ``shan.progress``, ``shan.metrics``,
   ``shan.runtime`` (Ray start-up and group sizing: it needs only the config and the errors);
2. ``shan.data.*``: the data set format, storage, readers, writers, converters;
3. ``shan.features.*``: region features from images (the Ray Data pipeline included);
4. ``shan`` (the package: its lazy public API), ``shan.model``, ``shan.reference``,
   ``shan.loss``, ``shan.scoring``, ``shan.checkpoint``, ``shan.fingerprint``,
   ``shan.pictures``, ``shan.index`` (the image index: card, FAISS, fragments),
   ``shan.rerank`` (sentences against an index: retrieve, then rerank);
5. ``shan.tracking.*`` (MLflow), ``shan.serving``, ``shan.promotion``, ``shan.server`` (the
   HTTP server of ``shan serve``);
6. the jobs: ``shan.train.*``, ``shan.eval.*``, ``shan.extract`` (images to a data set),
   ``shan.indexing`` (the index build); they never import each other; ``shan.sweep.*`` (Tune
   trials that are trainings) may import ``shan.train``, which never imports it;
7. ``shan.search.*``: builds on the library, never on the evaluation (``shan.eval.*``) nor on
   training;
8. ``shan_cli.*``: the command lines;
9. ``jobs/*.py``: shims that import ``shan_cli`` only.

A module of ``shan`` that no layer names is reported (a new module gets its place). There is no
import cycle: a cycle across layers holds an upward import (reported as such), and a cycle
inside one layer is reported as a cycle, so no import inside a function can hide one.

Besides the order: nothing in ``shan`` imports ``argparse`` (the library never parses a command
line) or ``shan_cli``; nothing in ``shan``, ``shan_cli`` or ``jobs`` imports ``shan_stack`` (the
local service stack, ``cluster/``).

The checks are functions of a source tree, so the tests also run them on a copy with planted
faults (the checker must see each one).
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


LAYERS: tuple[tuple[str, ...], ...] = (
    ("shan.errors",),
    ("shan.config", "shan.vocab", "shan.glove", "shan.progress", "shan.metrics", "shan.runtime"),
    ("shan.data",),
    ("shan.features",),
    ("shan", "shan.model", "shan.reference", "shan.loss", "shan.scoring", "shan.checkpoint",
     "shan.fingerprint", "shan.pictures", "shan.index", "shan.rerank",
     "shan.firststage"),
    ("shan.tracking", "shan.serving", "shan.promotion", "shan.server"),
    ("shan.train", "shan.eval", "shan.extract", "shan.indexing", "shan.sweep"),
    ("shan.search",),
    ("shan_cli",),
    ("jobs",),
)  # fmt: skip
# one layer; they never import each other
JOBS = ("shan.train", "shan.eval", "shan.extract", "shan.indexing")


@functools.cache
def place(name: str) -> tuple[int, str] | None:
    """(layer, the entry of :data:`LAYERS` that holds ``name``): the longest entry ``name`` is
    or lies in (``shan`` holds the package itself only); None outside the layers."""
    best = None
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            hit = name == entry if entry == "shan" else within(name, entry)
            if hit and (best is None or len(entry) > len(best[1])):
                best = (i, entry)
    return best


def rule_problem(source: str, target: str) -> str | None:
    """Why module ``source`` may not import ``target`` by a rule besides the order."""
    library = within(source, "shan")
    if library and within(target, "shan_cli"):
        return "the library never imports the command lines (shan_cli)"
    if library and within(target, "shan_stack"):
        return "the library never imports the local service stack (shan_stack)"
    if library and within(target, "argparse"):
        return "the library never parses a command line (argparse)"
    if within(source, "shan_cli") and within(target, "shan_stack"):
        return "shan_cli never imports shan_stack"
    if within(source, "jobs"):
        if within(target, "shan_stack"):
            return "jobs/ never imports shan_stack"
        if not within(target, "shan_cli") and target != "__future__":
            return "a job shim imports shan_cli only"
    src = next((j for j in JOBS if within(source, j)), None)
    dst = next((j for j in JOBS if within(target, j)), None)
    if src and dst and src != dst:
        return f"{', '.join(JOBS[:-1])} and {JOBS[-1]} never import each other"
    if src and within(target, "shan.sweep"):
        return "the jobs never import shan.sweep (it builds on shan.train)"
    if within(source, "shan.search") and within(target, "shan.train"):
        return "shan.search never imports shan.train"
    if within(source, "shan.search") and within(target, "shan.eval"):
        return "shan.search never imports the evaluation (shan.eval)"
    return None


@functools.cache
def import_problem(source: str, target: str) -> str | None:
    """Why module ``source`` may not import ``target`` (None: it may)."""
    why = rule_problem(source, target)
    if why:
        return why
    src, dst = place(source), place(target)
    if src and dst and dst[0] > src[0]:
        return f"{src[1]} (layer {src[0]}) imports {dst[1]} (layer {dst[0]}), a layer above it"
    return None


def layer_problems(root: Path) -> list[str]:
    """One line per import that breaks the layers (file, line, statement, rule), per module
    that no layer holds, and per import cycle among the imports that keep the order."""
    mods = modules(root)
    known = {m.name for m in mods}
    problems = []
    edges: dict[str, dict[str, str]] = {}  # module -> imported module -> where, statement
    for m in mods:
        if place(m.name) is None:
            problems.append(
                f"{m.path.relative_to(root)}:1 ({m.name}): in no layer: add it to LAYERS"
            )
        for line, target, text in imports(m, known):
            where = f"{m.path.relative_to(root)}:{line} ({m.name}): {text}"
            why = import_problem(m.name, target)
            if why:
                problems.append(f"{where}: {why}")
            elif target in known:
                edges.setdefault(m.name, {}).setdefault(target, where)
    return problems + cycle_problems(edges)


def cycle_problems(edges: dict[str, dict[str, str]]) -> list[str]:
    """One line per import cycle of the graph ``edges`` (module -> imported module -> where it
    is imported): a shortest cycle through the first module of each strongly connected set."""
    problems = []
    for group in strongly_connected(edges):
        first = min(group)
        path = shortest_cycle(first, edges, group)
        if path is None:
            continue
        steps = list(zip(path, path[1:]))
        chain = " -> ".join(path)
        lines = "; ".join(edges[a][b] for a, b in steps)
        problems.append(f"{edges[first][path[1]]}: import cycle {chain} (via {lines})")
    return problems


def strongly_connected(edges: dict[str, dict[str, str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of ``edges``, each as a set of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            out.append(group)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def shortest_cycle(
    start: str, edges: dict[str, dict[str, str]], group: set[str]
) -> list[str] | None:
    """``[start, ..., start]``: a shortest cycle through ``start`` inside ``group`` (None when
    there is none: a module alone that does not import itself)."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges.get(v, {})):
                if w == start:  # back at the start: the way here, read backwards
                    back = [v]
                    while back[-1] != start:
                        back.append(parents[back[-1]])
                    return [*reversed(back), start]
                if w in group and w not in parents and w != start:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return None


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


@functools.cache
def project_problems() -> tuple[str, ...]:
    """The project's own problems (none, when test_layers passes), computed once."""
    return tuple(layer_problems(ROOT))


def test_layers():
    problems = project_problems()
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
        # the order: an import of a higher layer, at module level or inside a function
        ("shan/errors.py", "from shan.config import ConfigError\n",
         "from shan.config import ConfigError", "shan.errors (layer 0) imports shan.config"),
        ("shan/metrics.py", "def f():\n    from shan.train import worker\n",
         "from shan.train import worker", "shan.metrics (layer 1) imports shan.train"),
        ("shan/data/format.py", "def f():\n    from shan.features import ExtractorSpec\n",
         "from shan.features import ExtractorSpec", "shan.data (layer 2) imports shan.features"),
        ("shan/features/pipeline.py", "def f():\n    from shan.scoring import autocast\n",
         "from shan.scoring import autocast", "shan.features (layer 3) imports shan.scoring"),
        ("shan/checkpoint.py", "def f():\n    from shan.tracking import refs\n",
         "from shan.tracking import refs", "shan.checkpoint (layer 4) imports shan.tracking"),
        ("shan/promotion.py", "def f():\n    import shan.eval.job\n",
         "import shan.eval.job", "shan.promotion (layer 5) imports shan.eval (layer 6)"),
        ("shan/tracking/runs.py", "from ..eval import tiles\n",
         "from ..eval import tiles", "shan.tracking (layer 5) imports shan.eval"),
        ("shan/scoring.py", "from shan.search import query\n",
         "from shan.search import query", "imports shan.search (layer 7), a layer above it"),
        ("shan/eval/job.py", "from shan.search.index import image_index\n",
         "from shan.search.index import image_index", "shan.eval (layer 6) imports shan.search"),
        ("shan/search/query.py", "def f():\n    from shan_cli import search\n",
         "from shan_cli import search", "never imports the command lines"),
        ("shan_cli/main.py", "def f():\n    import jobs.train\n",
         "import jobs.train", "shan_cli (layer 8) imports jobs (layer 9)"),
        # the rules besides the order
        ("shan/search/job.py", "from shan.train import worker\n",
         "from shan.train import worker", "shan.search never imports shan.train"),
        ("shan/search/job.py", "def f():\n    from shan.eval.job import EvalModel\n",
         "from shan.eval.job import EvalModel", "never imports the evaluation"),
        ("shan/search/index.py", "from shan.eval import outputs\n",
         "from shan.eval import outputs", "shan.search never imports the evaluation"),
        ("shan/eval/outputs.py", "from shan.train.worker import lr_at\n",
         "from shan.train.worker import lr_at", "never import each other"),
        ("shan/train/driver.py", "from . import worker\nfrom ..eval import job\n",
         "from ..eval import job", "never import each other"),
        ("shan/train/driver.py", "def f():\n    from shan.sweep import job\n",
         "from shan.sweep import job", "never import shan.sweep"),
        ("shan/extract.py", "def f():\n    from shan.eval import tiles\n",
         "from shan.eval import tiles", "never import each other"),
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
    start = plant(tree / file, code)
    new = sorted(set(layer_problems(tree)) - set(project_problems()))
    assert len(new) == 1, new
    line = start + code.splitlines().index(next(s for s in code.splitlines() if statement in s))
    assert new[0].startswith(f"{file}:{line} ") and statement in new[0] and rule in new[0], new


@pytest.mark.parametrize(
    ("file", "code", "cycle"),
    [
        # two modules of one layer, the closing import inside a function
        ("shan/data/fs.py", "def f():\n    from shan.data.format import CARD\n",
         "shan.data.format -> shan.data.fs -> shan.data.format"),
        ("shan/vocab.py", "def f():\n    from shan.glove import load_glove\n",
         "shan.glove -> shan.vocab -> shan.glove"),
        # three modules, under TYPE_CHECKING
        ("shan/tracking/context.py",
         "from typing import TYPE_CHECKING\n"
         "if TYPE_CHECKING:\n    from shan.tracking.refs import ModelRef\n",
         "shan.tracking.context -> shan.tracking.refs -> shan.tracking.runs -> "
         "shan.tracking.context"),
        # a package and its own module
        ("shan/eval/__init__.py", "def f():\n    from shan.eval import job\n",
         "shan.eval -> shan.eval.job -> shan.eval"),
        # a module that imports itself
        ("shan/metrics.py", "def f():\n    from shan import metrics\n",
         "shan.metrics -> shan.metrics"),
    ],
)  # fmt: skip
def test_a_planted_cycle_is_found(tree, file, code, cycle):
    start = plant(tree / file, code)
    new = sorted(set(layer_problems(tree)) - set(project_problems()))
    assert len(new) == 1, new
    line = start + len(code.splitlines()) - 1  # the planted import is the last line
    assert f"import cycle {cycle} (via " in new[0], new
    assert f"{file}:{line} " in new[0], new


def test_a_module_in_no_layer_is_found(tree):
    (tree / "shan" / "extra.py").write_text('"""A module no layer holds."""\n')
    new = sorted(set(layer_problems(tree)) - set(project_problems()))
    assert new == ["shan/extra.py:1 (shan.extra): in no layer: add it to LAYERS"], new


def test_the_copy_is_the_project(tree):
    assert layer_problems(tree) == list(project_problems())


def test_every_layer_entry_names_a_module():
    """An entry of LAYERS that names nothing (a module moved or renamed) is a stale entry."""
    names = {m.name for m in modules(ROOT)}
    stale = [e for entries in LAYERS for e in entries if not any(within(n, e) for n in names)]
    assert not stale, stale


def test_allowed_imports_are_not_reported(tree):
    plant(tree / "shan_cli/evaluate.py", "import shan.train.driver\nfrom shan.eval import tiles\n")
    plant(tree / "shan/train/driver.py", "from shan import promotion\nfrom . import worker\n")
    plant(tree / "shan/eval/job.py", "import shan.tracking.runs\nfrom shan import runtime\n")
    plant(tree / "shan/search/job.py", "from shan import pictures\nimport shan.extract\n")
    plant(tree / "shan/features/pipeline.py", "from shan.runtime import init_ray\n")
    plant(tree / "shan/data/format.py", "from shan.config import Config\nfrom shan import errors\n")
    plant(tree / "shan/checkpoint.py", "def f():\n    from shan.loss import BatchLoss\n")
    plant(tree / "jobs/train.py", "from __future__ import annotations\nimport shan_cli.main\n")
    assert set(layer_problems(tree)) == set(project_problems())


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
