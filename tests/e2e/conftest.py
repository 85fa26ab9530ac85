"""The end-to-end area: every test here drives real processes (dockerd, registry, ctorrent, opentracker, network
namespaces), so each is marked ``e2e`` here once (``-m "not e2e"`` leaves the area out). The fixtures these tests
share with the other areas (a real dockerd, the image factory, a registry process, the CLI) are in
tests/conftest.py; fixtures of one module stay in that module."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)
