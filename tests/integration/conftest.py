"""Every test collected under ``tests/integration/`` is marked ``integration``: it uses a real
Ray instance, MLflow server or S3 endpoint (the session fixtures of ``tests/conftest.py``), or
runs a job as a subprocess. ``pytest -m "not integration"`` (or ``pytest tests/unit``) leaves
them out.

When the multi-node test is among the tests to run, its scenario starts with the first
integration test and runs beside the others (:mod:`tests.integration.multinode_run`)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
MULTINODE = "test_multinode.py::"


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def multinode(request, tmp_path_factory):
    """The multi-node scenario started in the background when its test is to run (and
    namespaces can be made here); None otherwise. Its test waits for it."""
    from netns_cluster import why_not_here

    from tests.integration.multinode_run import MultinodeRun

    wanted = any(MULTINODE in item.nodeid for item in request.session.items)
    if not wanted or why_not_here():
        yield None
        return
    run = MultinodeRun(tmp_path_factory.mktemp("multinode")).start()
    yield run
    run.wait()  # a session cut short still tears the cluster down
