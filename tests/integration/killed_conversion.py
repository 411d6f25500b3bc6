"""``jobs/prepare_data.py precomp`` killed as ``kill -9`` would kill it (SIGKILL, nothing cleaned
up) right after its N-th chunk is written::

    python -m tests.integration.killed_conversion N ARGS...   # ARGS: those of jobs/prepare_data.py

``test_data_safety.py`` runs it: the data set it was replacing must stay whole, and a new one
must not look complete.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import shan_cli.prepare_data as prepare_data


def killed_after(n: int) -> Any:
    """``convert_precomp`` that SIGKILLs this process once ``n`` chunks are written."""
    convert = prepare_data.convert_precomp

    def on_chunk(chunks: int) -> None:
        if chunks >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return lambda *args, **kw: convert(*args, **kw, on_chunk=on_chunk)


if __name__ == "__main__":
    from shan_cli import run_job

    prepare_data.convert_precomp = killed_after(int(sys.argv[1]))
    run_job(lambda: prepare_data.main(sys.argv[2:]))
