"""A PostgreSQL server the registry cannot use. At start-up (`docket-registry --db`, or a URL that is no database
docket knows): one error line with a hint, exit 8, before anything starts (no tracker, no seeder, no database
changed). While serving: 503 in each API's error shape, never a 500."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.support.postgres import PostgresServer
from tests.support.procs import free_port
from tests.support.registry_server import RegistryServer


def _refused(tmp_path: Path, db: str) -> tuple[str, str]:
    """Run the registry with ``--db db``; it must exit 8 with one error line and a hint: (that line, the hint)."""
    server = RegistryServer(location=tmp_path / "registry", port=free_port(), tracker_port=free_port(),
                            log=tmp_path / "registry.log", db_url=db)
    result = subprocess.run(server.args(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 8, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    [error] = [line for line in result.stderr.splitlines() if line.startswith("docket-registry: error:")]
    [hint] = [line for line in result.stderr.splitlines() if line.startswith("  hint: ")]
    assert "opentracker pid" not in result.stderr  # refused before anything started
    return error, hint


def test_nothing_listening_is_one_line_naming_the_server(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    error, hint = _refused(tmp_path, f"postgresql+psycopg://docket@127.0.0.1:{port}/docket")
    assert f"cannot use the database postgresql+psycopg://docket@127.0.0.1:{port}/docket" in error
    assert "Connection refused" in error
    assert f"is PostgreSQL running at 127.0.0.1:{port}" in hint


def test_missing_database_says_create_it(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.url("docket_never_created")
    error, hint = _refused(tmp_path, url)
    assert 'database "docket_never_created" does not exist' in error
    assert "createdb -h 127.0.0.1" in hint and "docket_never_created" in hint


def test_unknown_role_says_check_the_user(tmp_path: Path, postgres: PostgresServer) -> None:
    url = postgres.url("postgres").replace("://docket@", "://nobody:secret@")
    error, hint = _refused(tmp_path, url)
    assert 'role "nobody" does not exist' in error and "secret" not in error  # the password is never shown
    assert "check the user and password" in hint


@pytest.mark.parametrize("url", ["mysql://docket@127.0.0.1/docket", "not a url"])
def test_a_url_docket_cannot_use_is_refused(tmp_path: Path, url: str) -> None:
    error, hint = _refused(tmp_path, url)
    assert "cannot use the database URL" in error
    assert "postgresql+psycopg://USER" in hint and "sqlite:///" in hint


def test_server_gone_while_serving_is_503_in_each_api(tmp_path: Path, make_app) -> None:
    """Our own server (the shared one must stay up), stopped under a running app."""
    server = PostgresServer.start()
    try:
        client = make_app(db_url=server.url(server.create_database())).test_client()
        assert client.get("/api/v1/images").get_json() == {"images": []}
        server.stop()
        resp = client.get("/api/v1/images")
        assert resp.status_code == 503, resp.get_data(as_text=True)
        assert "database server cannot be reached" in resp.get_json()["error"]["message"]
        v2 = client.get("/v2/team/app/tags/list")
        assert v2.status_code == 503 and v2.get_json()["errors"][0]["code"] == "UNAVAILABLE"
        assert client.get("/healthz").status_code == 503
    finally:
        server.stop()
