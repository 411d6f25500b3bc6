"""The reliability table of docs/reliability.md, generated from the bad-input case lists of the
tests.

    python tests/reliability.py            # print the table
    python tests/reliability.py --write    # replace the table in docs/reliability.md

The cases are the ``CASES`` lists of ``tests/integration/test_bad_inputs_*.py``;
``tests/unit/test_reliability_table.py`` fails when the page's table and the cases disagree.
Each row names its command as users type it (``shan data`` for the job ``prepare_data``).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASE_FILES = HERE / "integration"  # test_bad_inputs_<job>.py, each with its CASES
PAGE = ROOT / "docs" / "reliability.md"  # the page that holds the table
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"
# a case's job -> its ``shan`` command, where they differ
COMMAND = {"prepare_data": "data", "index": "index build"}


def all_cases() -> list:
    cases = []
    for path in sorted(CASE_FILES.glob("test_bad_inputs_*.py")):
        cases += importlib.import_module(f"tests.integration.{path.stem}").CASES
    return cases


def table() -> str:
    rows = [
        "| command | bad input | what you get (exit 2, one `error:` line per fault, naming) |",
        "|---|---|---|",
    ]
    for c in all_cases():
        names = ", ".join(f"`{n}`" for n in c.names)
        rows.append(f"| `shan {COMMAND.get(c.job, c.job)}` | {c.input} | {names} |")
    return "\n".join(rows)


def page_section(text: str) -> str:
    """The table between the markers of ``text`` (a page), or "" when the markers are missing."""
    if BEGIN not in text or END not in text:
        return ""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def write(page: Path = PAGE) -> None:
    text = page.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    page.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    # run as a script: the imports pytest's `pythonpath` gives the tests (pyproject.toml)
    for p in (str(ROOT / "cluster"), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)
    if "--write" in sys.argv:
        write()
    else:
        print(table())
