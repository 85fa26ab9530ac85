"""Client-side failures a user meets: Docker daemon down, tracker down, location on a full disk.

Each must be a clear error (what failed, what to do), a non-zero exit, and nothing half-done.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import requests

from tests.support.procs import free_port, port_open
from tests.support.registry_server import RegistryServer
from tests.support.tools import need



def test_docker_daemon_down(registry_server, image_factory, docket_cli, tmp_path: Path):
    ref, _ = image_factory.build(data_mib=1)
    docket_cli("push", ref, registry=registry_server)
    dead = {"DOCKER_HOST": f"unix://{tmp_path}/no-dockerd.sock"}

    push = docket_cli("push", ref, registry=registry_server, env=dead, check=False)
    assert push.returncode == 8, push.stderr
    assert "docker" in push.stderr.lower()

    location = tmp_path / "pull-loc"
    pull = docket_cli("pull", ref, registry=registry_server, env=dead, location=location, check=False)
    assert pull.returncode == 8, pull.stderr
    assert "docker" in pull.stderr.lower()
    blobs = location / "blobs"
    assert not blobs.exists() or not any(p.stat().st_size for p in blobs.iterdir())  # failed before downloading


class DeadTrackerRegistry(RegistryServer):
    """A registry told to use an external tracker that is not running: /healthz is 503 by design."""

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"registry exited with {self.proc.returncode}")
        return port_open("127.0.0.1", self.port)


def test_tracker_down_is_a_clear_transfer_error(image_factory, docket_cli, tmp_path: Path):
    need("ctorrent")
    dead_tracker = free_port()
    server = DeadTrackerRegistry(location=tmp_path / "reg", port=free_port(), tracker_port=free_port(),
                                 log=tmp_path / "reg.log", extra_args=["--tracker", f"127.0.0.1:{dead_tracker}"])
    server.start()
    try:
        health = requests.get(f"{server.url}/healthz", timeout=10)
        assert health.status_code == 503 and not health.json()["checks"]["tracker"]["ok"]
        ref, _ = image_factory.build(data_mib=1)
        docket_cli("push", ref, registry=server)
        image_factory.remove(ref)
        # --transport p2p: the default (auto) would continue over HTTP (tests/client/test_fallback.py)
        pull = docket_cli("pull", ref, "--transport", "p2p", "--stall-timeout", "5", "--seed-time", "0",
                          registry=server, peer_ip="127.0.0.51", check=False, timeout=120)
        assert pull.returncode == 9, pull.stderr
        assert f"127.0.0.1:{dead_tracker}" in pull.stderr
        with pytest.raises(Exception):
            image_factory.client.images.get(ref)  # nothing loaded
    finally:
        server.stop()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 2 MiB tmpfs we mount ourselves (root only) and always unmount."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("needs root to mount a small tmpfs")
        pytest.skip("needs root to mount a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_location_on_a_full_disk(registry_server, image_factory, docket_cli, small_disk: Path):
    ref, _ = image_factory.build(data_mib=4)
    docket_cli("push", ref, registry=registry_server)
    image_factory.remove(ref)
    pull = docket_cli("pull", ref, "--seed-time", "0", registry=registry_server, location=small_disk / "cache",
                      peer_ip="127.0.0.52", check=False)
    assert pull.returncode == 10, pull.stderr
    assert "disk space" in pull.stderr and str(small_disk) in pull.stderr
    with pytest.raises(Exception):
        image_factory.client.images.get(ref)  # nothing loaded
