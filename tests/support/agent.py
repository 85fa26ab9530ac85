"""A real `docket agent` process on a free loopback port, started and stopped by the tests."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.support.procs import port_open, stop_process, tail, wait_until
from tests.support.tools import program


@dataclass
class AgentProcess:
    registry_url: str
    cache_dir: Path
    port: int
    log: Path
    peer_ip: str | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """What docker pulls from: ``<address>/repo:tag``."""
        return f"127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        a = [program("docket"), "--host", self.registry_url, "agent",  # the installed program, as users start it
             "--listen", f"127.0.0.1:{self.port}", "--cache-dir", str(self.cache_dir), "--log-level", "debug"]
        if self.peer_ip:
            a += ["--peer-ip", self.peer_ip]
        return a + self.extra_args

    def start(self) -> AgentProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env})
        try:
            wait_until(self._ready, timeout=30, what=f"docket agent on port {self.port}")
        except TimeoutError:
            self.stop()
            raise AssertionError(f"agent did not start:\n{tail(self.log)}") from None
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{tail(self.log)}")
        if not port_open("127.0.0.1", self.port):
            return False
        return requests.get(f"{self.url}/healthz", timeout=5).status_code == 200

    def status(self) -> dict[str, Any]:
        return requests.get(f"{self.url}/_docket/agent", timeout=10).json()

    def outcome(self, digest: str) -> dict[str, Any]:
        found = [b for b in self.status()["blobs"] if b["digest"] == digest]
        assert found, f"the agent has no record of {digest}:\n{tail(self.log)}"
        return found[-1]

    def kill(self) -> None:
        """SIGKILL: no clean-up at all (its ctorrents die with it: PR_SET_PDEATHSIG)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout=30)
            self.proc = None

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
