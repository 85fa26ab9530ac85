"""Session-wide fixtures every area uses: a real dockerd, runnable test images built offline, a real
docket-registry process and the real `docket` command, a real PostgreSQL server.

A test runs on both databases the registry supports when it (or its module) is marked
``pytest.mark.databases("sqlite", "postgresql")`` and uses ``db_url`` (the registry fixtures do: ``make_app``/``app``
in tests/registry/conftest.py, ``registry_server`` here); ``databases("sqlite", reason=...)`` keeps one test of such
a module on SQLite. Unmarked tests run on SQLite only, as before.

Under CI (CI=true) a missing tool fails the test run; on a laptop it skips the tests that need it
(tests/support/tools.py).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.image_factory import ImageFactory
from tests.support.postgres import ENV_URL, PostgresServer, bin_dir
from tests.support.procs import background_seeders, free_port, managed_process, stop_background_seeders, wait_until
from tests.support.registry_server import RegistryServer
from tests.support.tools import IN_CI, need


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``db_url`` once per database the closest ``databases`` marker names, with the database as the test's id."""
    marker = metafunc.definition.get_closest_marker("databases")
    if marker is not None and "db_url" in metafunc.fixturenames:
        metafunc.parametrize("db_url", marker.args, indirect=True, ids=list(marker.args))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """The PostgreSQL server scripts/test.sh started (DOCKET_TEST_POSTGRES), or one of this process's own."""
    url = os.environ.get(ENV_URL)
    if url:
        yield PostgresServer.attach(url)
        return
    if bin_dir() is None:
        msg = "PostgreSQL is not installed (run scripts/setup.sh)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    server = PostgresServer.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_at_head(postgres: PostgresServer) -> Iterator[str]:
    """A database migrated to head once per session (test processes), the template of ``db_url``'s: a registry
    starting on a copy finds its schema there (the migrations themselves: tests/registry/test_migrations.py)."""
    from docket.registry.db import Database

    name = postgres.create_database()
    db = Database(postgres.url(name))
    db.migrate()
    db.dispose()  # a template nobody is connected to
    yield name
    postgres.drop_database(name)


@pytest.fixture
def pg_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the test PostgreSQL server, dropped after the test: for tests of several
    registry instances on one database (docs/instances.md)."""
    name = postgres.create_database()
    yield postgres.url(name)
    postgres.drop_database(name)


@pytest.fixture
def db_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    """The registry's ``--db``: None (SQLite in its location) unless parametrized with "postgresql", then a fresh
    database of the ``postgres`` server, dropped after the test (its apps and processes are gone by then: they
    depend on this fixture). It is a copy of a database at head (fast), or empty with ``databases(...,
    empty=True)``."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        yield None
        return
    assert backend == "postgresql", backend
    server: PostgresServer = request.getfixturevalue("postgres")
    marker = request.node.get_closest_marker("databases")
    empty = marker is not None and marker.kwargs.get("empty", False)
    name = server.create_database(None if empty else request.getfixturevalue("postgres_at_head"))
    try:
        yield server.url(name)
    finally:
        server.drop_database(name)


def _docker_ok(host: str) -> bool:
    import docker

    try:
        client = docker.DockerClient(base_url=host, timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return False


@pytest.fixture(scope="session")
def docker_host() -> Iterator[str]:
    """DOCKER_HOST of a working daemon: the one in the environment, or a private dockerd we start."""
    host = os.environ.get("DOCKER_HOST")
    if host and _docker_ok(host):
        yield host
        return
    dockerd = shutil.which("dockerd")
    if not dockerd or os.geteuid() != 0:
        msg = "no Docker daemon reachable and cannot start one (needs root and docker.io)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    root = Path(tempfile.mkdtemp(prefix="docket-dockerd-"))
    host = f"unix://{root}/docker.sock"
    args = [
        dockerd, "--data-root", f"{root}/data", "--exec-root", f"{root}/exec", "--pidfile", f"{root}/pid",
        "--host", host, "--bridge=none", "--iptables=false", "--ip-masq=false",
    ]
    with managed_process(args, root / "dockerd.log") as proc:
        wait_until(lambda: proc.poll() is None and _docker_ok(host), timeout=60, what="dockerd to answer")
        old = os.environ.get("DOCKER_HOST")
        os.environ["DOCKER_HOST"] = host
        try:
            yield host
        finally:
            if old is None:
                os.environ.pop("DOCKER_HOST", None)
            else:
                os.environ["DOCKER_HOST"] = old
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def docker_client(docker_host: str):
    import docker

    client = docker.DockerClient(base_url=docker_host, timeout=600)
    yield client
    client.close()


@pytest.fixture
def image_factory(docker_client, tmp_path: Path) -> Iterator[ImageFactory]:
    factory = ImageFactory(docker_client, tmp_path / "images")
    yield factory
    factory.cleanup()


@pytest.fixture
def registry_server(tmp_path: Path, db_url: str | None) -> Iterator[RegistryServer]:
    need("ctorrent")
    need("opentracker")
    server = RegistryServer(
        location=tmp_path / "registry", port=free_port(), tracker_port=free_port(), log=tmp_path / "registry.log",
        db_url=db_url,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def docket_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess]:
    """Run the real `docket` command (as a user would) and return the completed process."""

    def run(*args: str, registry: RegistryServer | None = None, peer_ip: str | None = None,
            location: Path | None = None, check: bool = True, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        full_env = {**os.environ, **(env or {})}
        cmd = [sys.executable, "-m", "docket.client.cli"]
        if registry is not None:
            cmd += ["--host", "http://127.0.0.1", "--port", str(registry.port)]
        cmd += ["--location", str(location or tmp_path / "client")]
        if peer_ip:
            full_env["DOCKET_PEER_IP"] = peer_ip
        cmd += list(args)
        result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=full_env,
                                timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    return run



@pytest.fixture(autouse=True)
def _no_background_seeder_left(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every test ends the background seeders its pulls started (a pull returns while one seeds on)."""
    before = set(background_seeders())
    yield
    stop_background_seeders(before, tmp_path_factory.getbasetemp())
