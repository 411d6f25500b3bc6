"""Print the N-th command of the README's "Quickstart" section (1: run the demo, 2: tests).

The section's code blocks must hold exactly two one-line commands; anything else is an error,
so the README and CI cannot drift apart.
"""

import re
import sys
from pathlib import Path


def quickstart_commands(readme: str) -> list[str]:
    m = re.search(r"^## Quickstart\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    if not m:
        raise SystemExit("README.md has no '## Quickstart' section")
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", m.group(1), flags=re.S)
    lines = [line for b in blocks for line in b.strip().splitlines()]
    if len(blocks) != 2 or len(lines) != 2:
        raise SystemExit(f"Quickstart must hold two one-line commands, found {lines}")
    return lines


if __name__ == "__main__":
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    print(quickstart_commands(text)[int(sys.argv[1]) - 1])
