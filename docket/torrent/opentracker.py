"""Supervise one opentracker process: whitelist mode (the Debian build only has that), reload by SIGHUP.

As root opentracker refuses to run unless it drops privileges (``-u nobody``) and it chroots to ``-d workdir``:
the whitelist path given with ``-w`` is therefore relative to the workdir, which must be readable by nobody.

``guarded=True`` (registries with read tokens): opentracker listens on a free port of 127.0.0.1 only and a
``TrackerGuard`` (docket/torrent/guard.py) takes the public address: announces and single-torrent scrapes pass,
stats and the full scrape (which this build gives to anyone and cannot turn off) do not.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from docket.errors import InvalidRequest, ServiceUnavailable, ToolMissing
from docket.torrent.guard import TrackerGuard, check_loopback
from docket.torrent.metainfo import ipv4_address
from docket.torrent.processes import stop_child

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `apt-get install opentracker` (or scripts/install_tracker.sh)"
WHITELIST_NAME = "whitelist.txt"
PLACEHOLDER_HASH = "0" * 40
_HEX40 = re.compile(r"\A[0-9a-f]{40}\Z")


def find_opentracker() -> str:
    """Path of the opentracker binary (PATH, then /usr/bin)."""
    path = shutil.which("opentracker") or (
        "/usr/bin/opentracker" if os.access("/usr/bin/opentracker", os.X_OK) else None)
    if not path:
        raise ToolMissing("opentracker is not installed", hint=INSTALL_HINT)
    return path


def _normalise(info_hashes: Iterable[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for h in info_hashes:
        h = str(h).strip().lower()
        if not _HEX40.match(h):
            raise InvalidRequest(f"not an info hash: {h!r}", hint="40 hexadecimal characters")
        if h not in seen:
            seen.add(h)
            out.append(h)
    return out


INNER_IP = "127.0.0.1"  # guarded: opentracker's own address (the guard connects from 127.64.0.0/10)


def _free_port(ip: str) -> int:
    """A TCP port free on ``ip`` now that is also free for UDP (opentracker opens both)."""
    for _ in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((ip, port))
            except OSError:
                continue
        return port
    raise ServiceUnavailable(f"no free port on {ip} for opentracker")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


class Opentracker:
    """One opentracker child on ``bind_ip:port`` (TCP, plus UDP on the same port), whitelist in ``workdir``."""

    def __init__(self, bind_ip: str, port: int, workdir: Path, *, admin_ip: str | None = None,
                 log_path: Path | None = None, udp_port: int | None = None, guarded: bool = False) -> None:
        ipv4_address(bind_ip, "bind_ip")  # opentracker (Debian build) is IPv4 only
        self.bind_ip = bind_ip
        self.port = int(port)
        self.udp_port = int(udp_port) if udp_port is not None else self.port
        self.guarded = guarded
        self._guard: TrackerGuard | None = None
        self._inner_port: int | None = None  # guarded: opentracker's own port on 127.0.0.1
        self.workdir = Path(workdir).absolute()
        self.admin_ip = admin_ip
        self.log_path = Path(log_path) if log_path else None
        self.whitelist_path = self.workdir / WHITELIST_NAME
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=200)
        self._lock = threading.Lock()  # serialises whitelist writes and signals
        self._hashes: list[str] = []
        self._log_file: IO[bytes] | None = None

    @property
    def announce_url(self) -> str:
        return f"http://{self.bind_ip}:{self.port}/announce"

    @property
    def scrape_url(self) -> str:
        return f"http://{self.bind_ip}:{self.port}/scrape"

    @property
    def whitelist(self) -> list[str]:
        return list(self._hashes)

    @property
    def _listen(self) -> tuple[str, int]:
        """Where opentracker itself listens: the public address, or 127.0.0.1 behind the guard."""
        if self.guarded:
            assert self._inner_port is not None
            return INNER_IP, self._inner_port
        return self.bind_ip, self.port

    def args(self) -> list[str]:
        ip, port = self._listen
        udp = port if self.guarded else self.udp_port
        a = [find_opentracker(), "-i", ip, "-p", str(port), "-P", str(udp), "-d", str(self.workdir), "-w",
             WHITELIST_NAME]
        if os.geteuid() == 0:
            a += ["-u", "nobody"]
        if self.admin_ip and not self.guarded:  # guarded: no stats for anyone (mode=tpbs is a full scrape too)
            a += ["-A", self.admin_ip]
        return a

    def _write_whitelist(self, hashes: list[str]) -> None:
        """Temp file + rename in the same directory: opentracker never reads a half-written list."""
        # opentracker ignores an EMPTY whitelist on SIGHUP (keeps the old one: measured), so an empty list is
        # written as one placeholder hash that no real torrent has.
        lines = hashes or [PLACEHOLDER_HASH]
        fd, tmp = tempfile.mkstemp(prefix=".whitelist-", dir=self.workdir)
        try:
            with os.fdopen(fd, "w") as f:
                f.write("".join(h + "\n" for h in lines))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # readable by nobody after the privilege drop
            os.replace(tmp, self.whitelist_path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def start(self, info_hashes: Iterable[str] = (), timeout: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            raise RuntimeError("opentracker already running")
        hashes = _normalise(info_hashes)
        if _port_open(self.bind_ip, self.port):  # else we would mistake another server for ours
            raise ServiceUnavailable(f"cannot start opentracker: {self.bind_ip}:{self.port} is already in use",
                                     hint="choose another --tracker-port")
        if self.guarded:
            try:
                check_loopback()
            except OSError as exc:
                raise ServiceUnavailable(f"cannot run the tracker guard: {exc}",
                                         hint="bring the loopback interface up: ip link set lo up") from exc
            self._inner_port = _free_port(INNER_IP)
        listen_ip, listen_port = self._listen
        self.workdir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o755)  # nobody must read the whitelist inside the chroot
        with self._lock:
            self._write_whitelist(hashes)
            self._hashes = hashes
        args = self.args()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed by the reader thread
        log.debug("starting %s", args)
        try:
            self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, cwd=self.workdir, close_fds=True)
        except OSError as exc:
            raise ServiceUnavailable(f"cannot start opentracker: {exc}", hint=INSTALL_HINT) from exc
        self.pid = self._proc.pid
        self._reader = threading.Thread(target=self._read, name=f"opentracker-{self.pid}", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not _port_open(listen_ip, listen_port):
            if self._proc.poll() is not None:
                self._reader.join(2)
                self._proc = None
                raise ServiceUnavailable(
                    f"opentracker exited at start (port {listen_ip}:{listen_port} busy?): {self.tail_text()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceUnavailable(f"opentracker did not listen on {listen_ip}:{listen_port} "
                                         f"within {timeout}s: {self.tail_text()}")
            time.sleep(0.05)
        if self._proc.poll() is not None:
            self._reader.join(2)
            self._proc = None
            raise ServiceUnavailable(f"opentracker exited at start: {self.tail_text()}")
        if self.guarded:
            guard = TrackerGuard((self.bind_ip, self.port), (listen_ip, listen_port))
            try:
                guard.start()
            except OSError as exc:
                self.stop()
                raise ServiceUnavailable(f"cannot listen on {self.bind_ip}:{self.port}: {exc.strerror or exc}",
                                         hint="choose another --tracker-port") from exc
            self._guard = guard
        log.info("opentracker pid %d on %s (%d whitelisted)", self.pid, self.announce_url, len(hashes))

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for raw in self._proc.stdout:
            if self._log_file:
                try:
                    self._log_file.write(raw)
                    self._log_file.flush()
                except OSError:
                    pass
            line = raw.decode("utf-8", "replace").rstrip()
            if line:
                self._lines.append(line)
                log.debug("opentracker: %s", line)
        if self._log_file:
            try:
                self._log_file.close()
            except OSError:
                pass

    def set_whitelist(self, info_hashes: Iterable[str]) -> None:
        """Replace the whitelist atomically and SIGHUP; measured effective on the next announce (< 0.1 s)."""
        hashes = _normalise(info_hashes)
        with self._lock:
            self._write_whitelist(hashes)
            self._hashes = hashes
            if self.alive():
                assert self._proc is not None
                try:
                    self._proc.send_signal(signal.SIGHUP)
                except ProcessLookupError:
                    pass
        log.debug("whitelist now %d hashes", len(hashes))

    def add(self, *info_hashes: str) -> None:
        """Whitelist more hashes, keeping the current ones."""
        self.set_whitelist([*self._hashes, *info_hashes])

    def alive(self) -> bool:
        guard_ok = not self.guarded or (self._guard is not None and self._guard.alive())
        return self._proc is not None and self._proc.poll() is None and guard_ok

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait, SIGKILL; our pid only. Idempotent."""
        guard, self._guard = self._guard, None
        if guard is not None:
            guard.stop()
        proc = self._proc
        if proc is None:
            return
        stop_child(proc, timeout)
        if self._reader is not None:
            self._reader.join(5)
        log.info("opentracker pid %d stopped", proc.pid)

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def tail(self, n: int = 20) -> list[str]:
        return list(self._lines)[-n:]

    def tail_text(self, n: int = 10) -> str:
        return " | ".join(self.tail(n)) or "(no output)"

    def __enter__(self) -> Opentracker:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
