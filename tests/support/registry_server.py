"""A real `docket-registry` process on free loopback ports, started and stopped by the tests."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.procs import port_open, stop_process, tail, wait_until


@dataclass
class RegistryServer:
    """A real `docket-registry` process with its managed opentracker, on free loopback ports."""

    location: Path
    port: int
    tracker_port: int
    log: Path
    proc: subprocess.Popen | None = None
    extra_args: list[str] = field(default_factory=list)
    db_url: str | None = None  # --db; None: SQLite in the location

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        return [
            sys.executable, "-m", "docket.registry.cli",
            "--port", str(self.port), "--bind", "127.0.0.1", "--location", str(self.location),
            "--advertise-address", "127.0.0.1", "--tracker-port", str(self.tracker_port),
            "--log-level", "DEBUG", *(["--db", self.db_url] if self.db_url else []), *self.extra_args,
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
