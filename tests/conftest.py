"""Shared fixtures: a real dockerd, runnable test images built offline, a real docket-registry.

Under CI (CI=true) a missing tool fails the test run; on a laptop it skips the tests that need it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from flask import Flask

from docket.registry import RegistryConfig, create_app
from procs import free_port, managed_process, port_open, stop_process, tail, wait_until

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
BUSYBOX = Path("/bin/busybox")


def need(tool: str) -> str:
    """Path of ``tool``; fail under CI, skip elsewhere, when it is missing."""
    path = shutil.which(tool) or (str(BUSYBOX) if tool == "busybox" and BUSYBOX.exists() else None)
    if path:
        return path
    msg = f"{tool} is not installed (run scripts/install_tracker.sh or .ci/run)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


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


@dataclass
class ImageFactory:
    """Builds runnable images offline: FROM scratch, busybox, and a layer of random data."""

    client: object
    workdir: Path
    built: list[str] = field(default_factory=list)

    def build(self, ref: str | None = None, data_mib: float = 2, marker: str | None = None) -> tuple[str, str]:
        """Build ``ref``; returns (ref, marker). `docker run ref cat /marker` prints the marker."""
        ref = ref or f"docket-test/{uuid.uuid4().hex[:10]}:v1"
        marker = marker or uuid.uuid4().hex
        ctx = self.workdir / uuid.uuid4().hex
        ctx.mkdir(parents=True)
        shutil.copy(need("busybox"), ctx / "busybox")
        (ctx / "data.bin").write_bytes(os.urandom(int(data_mib * 1024 * 1024)))
        (ctx / "marker").write_text(marker + "\n")
        (ctx / "Dockerfile").write_text(
            "FROM scratch\nCOPY busybox /bin/busybox\nCOPY data.bin /data.bin\nCOPY marker /marker\n"
            'ENTRYPOINT ["/bin/busybox"]\n'
        )
        self.client.images.build(path=str(ctx), tag=ref, rm=True, forcerm=True)
        shutil.rmtree(ctx, ignore_errors=True)
        self.built.append(ref)
        return ref, marker

    def run(self, ref: str, *cmd: str) -> str:
        out = self.client.containers.run(ref, list(cmd) or ["cat", "/marker"], remove=True, network_mode="none")
        return out.decode().strip()

    def remove(self, ref: str) -> None:
        import docker

        try:
            self.client.images.remove(ref, force=True)
        except docker.errors.ImageNotFound:
            pass

    def cleanup(self) -> None:
        for ref in self.built:
            self.remove(ref)


@pytest.fixture
def image_factory(docker_client, tmp_path: Path) -> Iterator[ImageFactory]:
    factory = ImageFactory(docker_client, tmp_path / "images")
    yield factory
    factory.cleanup()


@dataclass
class RegistryServer:
    """A real `docket-registry` process with its managed opentracker, on free loopback ports."""

    location: Path
    port: int
    tracker_port: int
    log: Path
    proc: subprocess.Popen | None = None
    extra_args: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        return [
            sys.executable, "-m", "docket.registry.cli",
            "--port", str(self.port), "--bind", "127.0.0.1", "--location", str(self.location),
            "--advertise-address", "127.0.0.1", "--tracker-port", str(self.tracker_port),
            "--log-level", "DEBUG", *self.extra_args,
        ]

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until(self._ready, timeout=60, what=f"docket-registry on port {self.port}")
        except TimeoutError:
            self.stop()
            raise AssertionError(f"registry did not start:\n{tail(self.log)}") from None

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"registry exited with {self.proc.returncode}:\n{tail(self.log)}")
        if not port_open("127.0.0.1", self.port):
            return False
        import requests

        return requests.get(f"{self.url}/healthz", timeout=5).status_code == 200

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def health(self) -> dict:
        import requests

        return requests.get(f"{self.url}/healthz", timeout=10).json()


@pytest.fixture
def registry_server(tmp_path: Path) -> Iterator[RegistryServer]:
    need("ctorrent")
    need("opentracker")
    server = RegistryServer(
        location=tmp_path / "registry", port=free_port(), tracker_port=free_port(), log=tmp_path / "registry.log"
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


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., Flask]]:
    """In-process registry apps under ``tmp_path`` for ``app.test_client()`` tests: no seeding, no GC thread;
    keyword arguments override the RegistryConfig. Every app made is closed at teardown."""
    made: list[Flask] = []

    def make(**overrides) -> Flask:
        settings = {"location": tmp_path / "registry", "seeding": False, "gc_interval": 0, "gc_grace": 600,
                    "tracker_port": 6999, **overrides}
        app = create_app(RegistryConfig(**settings))
        app.config["TESTING"] = True
        made.append(app)
        return app

    yield make
    for app in made:
        app.extensions["docket"].uploads.clear()
        app.extensions["docket"].db.dispose()
