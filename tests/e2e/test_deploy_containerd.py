"""The containerd files of deploy/ as a real containerd reads them: the shipped hosts.toml makes `ctr images pull
--hosts-dir` ask the mirror (the agent's address) first, over plain HTTP with no `--plain-http`, and the registry
(`server`) after it, also when nothing listens at the mirror's address; the config.toml lines deploy/README.md gives
are accepted by containerd's config loader.

The registry and the mirror here are two small HTTP servers that log each request and answer 404, so containerd
tries every host; the agent behind this configuration is tested with a real pull elsewhere. The only changes to
the shipped hosts.toml are the addresses: its registry name and the mirror's port 5000 become free loopback ports.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import subprocess
import tempfile
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.procs import free_port, managed_process, port_open, wait_until
from tests.support.tools import IN_CI, need

ROOT = Path(__file__).resolve().parents[2]
CERTS_D = ROOT / "deploy" / "containerd" / "certs.d"
MIRROR = "127.0.0.1:5000"


@dataclass
class RequestLog:
    lines: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, line: str) -> None:
        with self.lock:
            self.lines.append(line)

    def take(self) -> list[str]:
        with self.lock:
            lines, self.lines = self.lines, []
            return lines


def serve_404(name: str, port: int, log: RequestLog) -> http.server.ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:port that logs `name METHOD PATH` and answers a registry's 404."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            log.add(f"{name} {self.command} {self.path}")
            body = b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"not here"}]}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def containerd() -> Iterator[Path]:
    """A private containerd (its own root, state and socket; the CRI plugin off): its socket."""
    binary = need("containerd")
    need("ctr")
    if os.geteuid() != 0:
        msg = "containerd needs root"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    base = Path(tempfile.mkdtemp(prefix="dk-ctd-"))  # short: a unix socket path has at most 107 bytes
    sock = base / "containerd.sock"
    config = base / "config.toml"
    config.write_text(
        f'version = 2\nroot = "{base}/root"\nstate = "{base}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n'
    )
    try:
        with managed_process([binary, "--config", str(config)], base / "containerd.log") as proc:
            wait_until(lambda: proc.poll() is None and sock.exists() and subprocess.run(
                ["ctr", "--address", str(sock), "version"], capture_output=True, stdin=subprocess.DEVNULL,
                timeout=10).returncode == 0, timeout=30, what="containerd to answer")
            yield sock
    finally:
        shutil.rmtree(base, ignore_errors=True)


def hosts_dir_for(tmp: Path, registry_port: int, mirror_port: int) -> tuple[Path, str]:
    """A certs.d with the shipped hosts.toml, its addresses moved to these ports: (the dir, the registry)."""
    files = sorted(CERTS_D.glob("*/hosts.toml"))
    assert len(files) == 1, files
    shipped_name = files[0].parent.name
    text = files[0].read_text()
    assert f'"http://{shipped_name}"' in text and f'"http://{MIRROR}"' in text
    registry = f"127.0.0.1:{registry_port}"
    moved = text.replace(shipped_name, registry).replace(MIRROR, f"127.0.0.1:{mirror_port}")
    # Only the addresses changed: the same keys and capabilities as shipped.
    shipped, parsed = tomllib.loads(text), tomllib.loads(moved)
    assert list(parsed["host"].values()) == list(shipped["host"].values())
    (tmp / registry).mkdir(parents=True)
    (tmp / registry / "hosts.toml").write_text(moved)
    return tmp, registry


def ctr_pull(sock: Path, hosts_dir: Path, ref: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ctr", "--address", str(sock), "images", "pull", "--hosts-dir", str(hosts_dir), ref],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_containerd_asks_the_mirror_first_then_the_registry(containerd: Path, tmp_path: Path) -> None:
    log = RequestLog()
    registry_port, mirror_port = free_port(), free_port()
    servers = [serve_404("registry", registry_port, log), serve_404("mirror", mirror_port, log)]
    try:
        hosts_dir, registry = hosts_dir_for(tmp_path / "certs.d", registry_port, mirror_port)
        result = ctr_pull(containerd, hosts_dir, f"{registry}/myapp:v42")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    assert result.returncode != 0  # both answered 404
    assert "not found" in result.stderr
    requests = log.take()
    # The mirror first, plain HTTP, told which registry the name belongs to (`ns`); then the registry itself.
    assert re.fullmatch(rf"mirror (HEAD|GET) /v2/myapp/manifests/v42\?ns=127\.0\.0\.1%3A{registry_port}",
                        requests[0]), requests
    first_registry = next((i for i, r in enumerate(requests) if r.startswith("registry")), None)
    assert first_registry is not None and first_registry >= 1, requests
    assert all(r.startswith("mirror") for r in requests[:first_registry]), requests
    assert requests[first_registry] == f"registry {requests[0].split()[1]} /v2/myapp/manifests/v42", requests


def test_containerd_falls_back_to_the_registry_when_the_mirror_is_down(containerd: Path, tmp_path: Path) -> None:
    log = RequestLog()
    registry_port, mirror_port = free_port(), free_port()
    assert not port_open("127.0.0.1", mirror_port)  # nothing listens where the agent would
    server = serve_404("registry", registry_port, log)
    try:
        hosts_dir, registry = hosts_dir_for(tmp_path / "certs.d", registry_port, mirror_port)
        result = ctr_pull(containerd, hosts_dir, f"{registry}/myapp:v42")
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode != 0
    assert f"127.0.0.1:{mirror_port}" in result.stderr and "connection refused" in result.stderr
    requests = log.take()
    assert requests and requests[0] in {"registry HEAD /v2/myapp/manifests/v42",
                                        "registry GET /v2/myapp/manifests/v42"}, requests


def test_containerd_accepts_the_config_toml_lines_of_the_readme(tmp_path: Path) -> None:
    binary = need("containerd")
    text = (ROOT / "deploy" / "README.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S) if "config_path" in b]
    assert len(blocks) == 1, blocks
    config = tmp_path / "config.toml"
    config.write_text(blocks[0])
    # `config dump` loads the file as containerd would at start and prints the result (no daemon started).
    result = subprocess.run([binary, "--config", str(config), "config", "dump"], capture_output=True, text=True,
                            timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    dumped = tomllib.loads(result.stdout)
    assert dumped["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/etc/containerd/certs.d"
