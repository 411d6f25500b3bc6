"""Every test collected under ``tests/integration/`` is marked ``integration``: it uses a real
Ray instance, MLflow server or S3 endpoint (the session fixtures of ``tests/conftest.py``), or
runs a job as a subprocess. ``pytest -m "not integration"`` (or ``pytest tests/unit``) leaves
them out."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)
