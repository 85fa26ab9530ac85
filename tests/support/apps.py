"""In-process registry apps for Flask test-client tests, with the test defaults in one place: no seeding (no
ctorrent), no GC thread, a fixed tracker port for the announce URLs the tests compare."""

from __future__ import annotations

from pathlib import Path

from flask import Flask
from flask.testing import FlaskClient

from docket.registry import RegistryConfig, create_app

TEST_SETTINGS = {"seeding": False, "gc_interval": 0, "gc_grace": 600, "tracker_port": 6999}


def registry_app(location: Path, **overrides) -> Flask:
    """An app on ``location``; keyword arguments override the RegistryConfig fields of TEST_SETTINGS."""
    app = create_app(RegistryConfig(location=location, **{**TEST_SETTINGS, **overrides}))
    app.config["TESTING"] = True
    return app


def close_app(app: Flask) -> None:
    """Let go of what an app holds: its upload sessions and its database connections."""
    app.extensions["docket"].uploads.clear()
    app.extensions["docket"].db.dispose()


def push_tarball(client: FlaskClient, ref: str, data: bytes, **kw):
    """The original whole-tarball push: ``PUT /api/v1/repositories/<repo>/tags/<tag>``."""
    repo, _, tag = ref.rpartition(":")
    headers = {"Content-Type": "application/x-tar", **kw.pop("headers", {})}
    return client.put(f"/api/v1/repositories/{repo}/tags/{tag}", data=data, headers=headers, **kw)


def snapshot(client: FlaskClient, location: Path) -> dict:
    """What must not change when a request is rejected."""
    return {
        "images": client.get("/api/v1/images").get_json(),
        "blobs": sorted(p.name for p in (location / "blobs" / "sha256").iterdir()),
        "torrents": sorted(p.name for p in (location / "torrents").iterdir()),
        "uploads": sorted(p.name for p in (location / "uploads").iterdir()),
    }
