"""Unit tests never see a cluster: ``RAY_ADDRESS`` (which the integration tests' session
services set for the whole session) is removed for each of them, so that the rules that
depend on it (:func:`shan.runtime.on_cluster`) take their local branch unless a test sets it."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
