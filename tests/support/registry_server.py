"""A real `docket-registry` process on free loopback ports, started and stopped by the tests.

Alone (SQLite in its location, its managed opentracker) or as one of several instances (``db_url`` a PostgreSQL
URL, one shared ``location``, an external ``tracker``, each instance its own ``seed_address`` and port).
"""

from __future__ import annotations

import contextlib
import os
import signal
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
    db_url: str | None = None  # --db (a PostgreSQL URL shared by several instances); None: SQLite in the location
    tracker: str | None = None  # --tracker HOST:PORT (an external tracker); None: the registry manages opentracker
    seed_address: str | None = None  # --seed-address: each instance on one host its own 127.0.0.x (ctorrent)
    # What start() waits for: the full /healthz (""), or "instance": one of several instances is ready when a load
    # balancer would send it requests (what they share, e.g. seeding a blob another just stored, is the full one's).
    ready_scope: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        return [
            sys.executable, "-m", "docket.registry.cli",
            "--port", str(self.port), "--bind", "127.0.0.1", "--location", str(self.location),
            "--advertise-address", "127.0.0.1", "--tracker-port", str(self.tracker_port),
            "--log-level", "DEBUG",
            *(["--db", self.db_url] if self.db_url else []),
            *(["--tracker", self.tracker] if self.tracker else []),
            *(["--seed-address", self.seed_address] if self.seed_address else []),
            *self.extra_args,
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

        scope = f"?scope={self.ready_scope}" if self.ready_scope else ""
        return requests.get(f"{self.url}/healthz{scope}", timeout=5).status_code == 200

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)
            self.proc = None

    def kill(self) -> list[int]:
        """SIGKILL, as a machine lost: the registry process and the seeders (ctorrent) it had started, each by its
        pid (the children are read before the kill: afterwards they belong to init). Returns the children's pids."""
        if self.proc is None:
            return []
        children = child_pids(self.proc.pid)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(10)
        for pid in children:
            if _is_ctorrent(pid):  # still the process we saw (a pid is not reused that fast, but check)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.proc = None
        return children

    def restart(self) -> None:
        self.stop()
        self.start()

    def health(self) -> dict:
        import requests

        return requests.get(f"{self.url}/healthz", timeout=10).json()


def child_pids(pid: int) -> list[int]:
    """The direct children of ``pid`` (every thread's list: a child belongs to the thread that forked it)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    return sorted(set(found))


def _is_ctorrent(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0]
    except OSError:
        return False
    return os.path.basename(argv0) == b"ctorrent"
