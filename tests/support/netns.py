"""Hosts in network namespaces for end-to-end tests (the approach of benchmarks/swarm.py's Lab, unshaped).

One namespace ``<tag>-br`` holds a Linux bridge; every host is a namespace ``<tag>-<name>`` with one veth into
it and one 198.18.0.0/15 address. Both ends of each veth are created inside namespaces, so nothing appears in
the root namespace and parallel runs (different pids in the tag) never collide. ``close()`` stops what still
runs inside our namespaces (by pid) and deletes them, veths and bridge with them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support.tools import IN_CI

NET = ipaddress.ip_network("198.18.0.0/15")


def require_netns(what: str, tools: Sequence[str] = ("ip", "curl", "ctorrent", "opentracker")) -> None:
    """Skip (fail under CI=true) unless we are root and ``tools`` are installed."""
    why = "" if os.geteuid() == 0 else "needs root"
    for tool in tools:
        if not why and shutil.which(tool) is None:
            why = f"{tool} is not installed"
    if why:
        if IN_CI:
            pytest.fail(f"{what} cannot run under CI: {why}")
        pytest.skip(why)


def _run(args: Sequence[str], check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), stdin=subprocess.DEVNULL, capture_output=True, text=True, check=check,
                          timeout=timeout)


def namespaces() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def stop_pids(pids: list[int], wait: float = 5.0) -> None:
    """SIGTERM, wait up to ``wait`` s, then SIGKILL: the processes left in a namespace we made (by pid)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if _alive(p)]
            time.sleep(0.05)
        if not pids:
            return


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


class Lab:
    """Named hosts on one bridge; use as a context manager so the namespaces go even when the test fails."""

    def __init__(self, prefix: str, hosts: dict[str, str]) -> None:
        self.tag = f"{prefix}{os.getpid()}"
        self.bridge = f"{self.tag}-br"
        self.hosts = dict(hosts)  # name -> IPv4 address
        for ip in self.hosts.values():
            if ipaddress.ip_address(ip) not in NET:
                raise ValueError(f"{ip} is not in {NET}: tests only use addresses of their own namespaces")
        self.created: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def __enter__(self) -> Lab:
        try:
            self.setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _add_ns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self.created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def setup(self) -> None:
        self._add_ns(self.bridge)
        _run(["ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", self.bridge, "link", "set", "br0", "up"])
        for k, (host, ip) in enumerate(self.hosts.items()):
            ns, port = self.ns(host), f"p{k}"
            self._add_ns(ns)
            _run(["ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns",
                  self.bridge])
            _run(["ip", "-n", ns, "addr", "add", f"{ip}/{NET.prefixlen}", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", self.bridge, "link", "set", port, "master", "br0"])
            _run(["ip", "-n", self.bridge, "link", "set", port, "up"])

    def cmd(self, host: str, args: Sequence[str]) -> list[str]:
        """``args`` run on ``host`` (``ip netns exec`` execs them: the child's pid is the program's pid)."""
        ns = self.ns(host)
        assert ns in self.created, ns
        return ["ip", "netns", "exec", ns, *args]

    def spawn(self, host: str, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
              stdout: Path | None = None) -> subprocess.Popen:
        with open(log_path, "ab") as err, open(stdout or log_path, "ab") as out:
            return subprocess.Popen(self.cmd(host, args), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    env={**os.environ, **(env or {})}, start_new_session=True)

    def run(self, host: str, args: Sequence[str], timeout: float = 120.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(host, args), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})

    def pids(self, host: str) -> list[int]:
        out = _run(["ip", "netns", "pids", self.ns(host)], check=False).stdout
        return [int(p) for p in out.split()]

    def close(self) -> None:
        """Stop what still runs in OUR namespaces (TERM, then KILL; by pid), then delete the namespaces."""
        for ns in reversed(self.created):
            stop_pids([int(p) for p in _run(["ip", "netns", "pids", ns], check=False).stdout.split()])
        errors = []
        for ns in reversed(self.created):
            r = _run(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0:
                errors.append(f"{ns}: {r.stderr.strip()}")
        self.created.clear()
        if errors:
            raise RuntimeError(f"could not delete namespaces: {errors}")
