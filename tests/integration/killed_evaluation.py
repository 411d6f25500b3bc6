"""``jobs/evaluate.py`` killed as ``kill -9`` would kill it (exit status 137, nothing cleaned
up) right after its N-th tile is saved::

    python -m tests.integration.killed_evaluation N ARGS...   # ARGS: those of jobs/evaluate.py

``test_eval.py`` runs it, then the job again, which must skip the tiles already saved.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from shan.eval import tiles


def saving_then(n: int, then: Callable[[], Any]) -> Callable[..., None]:
    """A ``TileStore.save`` that calls ``then()`` right after the ``n``-th tile it saves."""
    save = tiles.TileStore.save
    saved = 0

    def counted(self: tiles.TileStore, *args: Any, **kw: Any) -> None:
        nonlocal saved
        save(self, *args, **kw)
        saved += 1
        if saved == n:
            then()

    return counted


if __name__ == "__main__":
    from shan_cli import run_job
    from shan_cli.evaluate import main

    tiles.TileStore.save = saving_then(int(sys.argv[1]), lambda: os._exit(137))  # type: ignore[method-assign]
    run_job(lambda: main(sys.argv[2:]))
