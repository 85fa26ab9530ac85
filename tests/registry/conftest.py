"""Fixtures of the registry tests: in-process apps through Flask's test client (tests/support/apps.py: no seeding,
no GC thread), made and closed here once for every module.

``app`` / ``client`` are the ordinary app on ``location``; a module or a test changes its RegistryConfig with the
``registry_config`` marker (a test's marker wins over its module's)::

    pytestmark = pytest.mark.registry_config(max_upload_size=LIMIT)

``make_app(**overrides)`` makes further apps in one test (other tokens or locations; not affected by the marker).
Every app uses the test's ``db_url`` (tests/conftest.py: SQLite, or PostgreSQL in modules marked ``databases``)
unless given its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from tests.support.apps import close_app, registry_app


@pytest.fixture
def location(tmp_path: Path) -> Path:
    return tmp_path / "registry"


@pytest.fixture
def make_app(location: Path, db_url: str | None) -> Iterator[Callable[..., Flask]]:
    """Apps on ``location`` unless given another; keyword arguments override the RegistryConfig. Every app made
    is closed at teardown."""
    made: list[Flask] = []

    def make(**overrides) -> Flask:
        overrides.setdefault("db_url", db_url)
        app = registry_app(overrides.pop("location", location), **overrides)
        made.append(app)
        return app

    yield make
    for app in made:
        close_app(app)


@pytest.fixture
def app(make_app: Callable[..., Flask], request: pytest.FixtureRequest) -> Flask:
    settings: dict = {}
    for marker in reversed(list(request.node.iter_markers("registry_config"))):  # module first, then the test's
        settings.update(marker.kwargs)
    return make_app(**settings)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()
