"""A real HAProxy (Debian `haproxy`) running the very configuration deploy/ ships, on a free loopback port.

deploy/haproxy.cfg takes its addresses from the environment (``${NAME-default}``): the tests set the bind address,
the two instances' addresses and the stats socket, and change nothing else. The server states come from the stats
socket (``show stat``), so a test can wait until HAProxy itself sees an instance up or down.
"""

from __future__ import annotations

import csv
import io
import os
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import port_open, stop_process, tail, wait_until
from tests.support.tools import need

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "haproxy.cfg"
BACKEND = "registries"
SERVERS = ("registry-1", "registry-2")  # the server names in deploy/haproxy.cfg, in order


@dataclass
class HAProxy:
    """``haproxy -db`` (foreground: our child, stopped by its pid) in front of two registry instances."""

    port: int
    backends: tuple[str, str]  # "HOST:PORT" of registry-1 and registry-2
    workdir: Path
    proc: subprocess.Popen | None = None
    config: Path = CONFIG
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "haproxy.sock"

    @property
    def log(self) -> Path:
        return self.workdir / "haproxy.log"

    def environment(self) -> dict[str, str]:
        return {"DOCKET_HAPROXY_BIND": f"127.0.0.1:{self.port}", "DOCKET_REGISTRY_1": self.backends[0],
                "DOCKET_REGISTRY_2": self.backends[1], "DOCKET_HAPROXY_STATS_SOCKET": str(self.socket_path),
                **self.env}

    def check(self) -> subprocess.CompletedProcess:
        """``haproxy -c``: the configuration is valid with these addresses."""
        return subprocess.run([need("haproxy"), "-c", "-f", str(self.config)], capture_output=True, text=True,
                              env={**os.environ, **self.environment()}, timeout=30, stdin=subprocess.DEVNULL)

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([need("haproxy"), "-db", "-f", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         env={**os.environ, **self.environment()})
        try:
            wait_until(self._ready, timeout=20, what=f"haproxy on port {self.port}")
        except (TimeoutError, AssertionError):
            self.stop()
            raise AssertionError(f"haproxy did not start:\n{tail(self.log)}") from None

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"haproxy exited with {self.proc.returncode}:\n{tail(self.log)}")
        return port_open("127.0.0.1", self.port) and self.socket_path.exists()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=10)
            self.proc = None

    def command(self, line: str) -> str:
        """One command on the stats socket (admin level), its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def stats(self) -> list[dict[str, str]]:
        """``show stat`` rows (CSV with a '# ' header)."""
        text = self.command("show stat").lstrip("# ")
        return list(csv.DictReader(io.StringIO(text)))

    def server_status(self) -> dict[str, str]:
        """server name -> HAProxy's status of it: "UP", "DOWN", "UP 1/2" (going down), "DOWN 1/2" (coming up)..."""
        return {row["svname"]: row["status"] for row in self.stats()
                if row["pxname"] == BACKEND and row["svname"] in SERVERS}

    def wait_status(self, expected: dict[str, str], timeout: float = 20.0) -> dict[str, str]:
        """Until each named server has exactly the status given (e.g. {"registry-1": "UP"})."""
        def matches() -> dict[str, str] | None:
            status = self.server_status()
            return status if all(status.get(k) == v for k, v in expected.items()) else None

        try:
            return wait_until(matches, timeout=timeout, interval=0.2, what=f"haproxy servers {expected}")
        except TimeoutError:
            try:
                status: object = self.server_status()
            except Exception as exc:  # noqa: BLE001 - the socket failing is the report
                status = exc
            raise AssertionError(f"haproxy servers are {status}, not {expected}; its last state changes:\n"
                                 f"{self.state_changes()}") from None

    def state_changes(self, lines: int = 10) -> str:
        """The log's "Server registries/... is UP/DOWN" lines (its request lines left out)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        found = [line for line in text.splitlines() if line.startswith(("Server ", "[WARNING]", "[ALERT]"))]
        return "\n".join(found[-lines:])

    def wait_all_up(self, timeout: float = 30.0) -> dict[str, str]:
        return self.wait_status({name: "UP" for name in SERVERS}, timeout=timeout)
