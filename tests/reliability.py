"""The README's reliability table, generated from the bad-input case lists of the tests.

    python tests/reliability.py            # print the table
    python tests/reliability.py --write    # replace the table in README.md

The cases are the ``CASES`` lists of ``tests/integration/test_bad_inputs_*.py``;
``tests/unit/test_reliability_table.py`` fails when the README's table and the cases disagree.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CASE_FILES = HERE / "integration"  # test_bad_inputs_<job>.py, each with its CASES
BEGIN, END = "<!-- reliability-table:begin -->", "<!-- reliability-table:end -->"


def all_cases() -> list:
    cases = []
    for path in sorted(CASE_FILES.glob("test_bad_inputs_*.py")):
        cases += importlib.import_module(f"tests.integration.{path.stem}").CASES
    return cases


def table() -> str:
    rows = [
        "| job | bad input | what you get (exit 2, one `error:` line per fault, naming) |",
        "|---|---|---|",
    ]
    for c in all_cases():
        names = ", ".join(f"`{n}`" for n in c.names)
        rows.append(f"| `{c.job}` | {c.input} | {names} |")
    return "\n".join(rows)


def readme_section(text: str) -> str:
    if BEGIN not in text or END not in text:
        return ""
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def write(readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    tail = rest.split(END, 1)[1]
    readme.write_text(f"{head}{BEGIN}\n{table()}\n{END}{tail}")


if __name__ == "__main__":
    # run as a script: the imports pytest's `pythonpath` gives the tests (pyproject.toml)
    for p in (str(ROOT / "cluster"), str(ROOT)):
        if p not in sys.path:
            sys.path.insert(0, p)
    if "--write" in sys.argv:
        write()
    else:
        print(table())
