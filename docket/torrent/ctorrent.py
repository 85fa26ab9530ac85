"""One ctorrent child process: started with an argument list, watched through its stdout, stopped by pid.

ctorrent's exit code is always 0, so everything we know comes from its output: the "Listening on IP:PORT" line,
the once-a-second status line (ended by \\r) and "Download complete.". A reader thread always drains the pipe so
ctorrent can never block on a full stdout.
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from collections.abc import Sequence
from typing import IO

from docket.errors import InvalidRequest, ServiceUnavailable, ToolMissing
from docket.torrent.engine import TorrentStatus
from docket.torrent.metainfo import ipv4_address
from docket.torrent.processes import popen_tied, record_pid, stop_child, stop_children

log = logging.getLogger(__name__)

INSTALL_HINT = "install it with `apt-get install ctorrent` (or scripts/install_tracker.sh)"
# Extra ctorrent flags for every ctorrent this process starts (seeders and pulls), e.g. "-z 64 -C 32": a knob for
# tuning and benchmarks (benchmarks/swarm.py --ctorrent-args); appended after the defaults, before extra_args.
EXTRA_ARGS_ENV = "DOCKET_CTORRENT_ARGS"
TAIL_LINES = 200

# "/ 1/0/2 [222/1024/1024] 444MB,0MB | 238703,0K/s | 0,0K E:0,1 Connecting"
# spinner seeds/leechers/swarm [have/total/available] down,up MB | down,up K/s | ... E:conn-failures,replies
_STATUS_RE = re.compile(
    r"^\s*[-\\|/]?\s*(\d+)/(\d+)/(\d+)\s+\[(\d+)/(\d+)/(\d+)\]\s+(\d+)MB,(\d+)MB\s+\|\s+(\d+(?:\.\d+)?),"
    r"(\d+(?:\.\d+)?)K/s"
    r"(?:.*?E:(\d+),(\d+))?"
)
_LISTEN_RE = re.compile(r"Listening on (\d{1,3}(?:\.\d{1,3}){3}):(\d+)")
_COMPLETE = "Download complete."
_TRACKER_FAILURE = "TRACKER FAILURE REASON:"


def find_ctorrent() -> str:
    """Path of the ctorrent binary (PATH, then /usr/bin)."""
    path = shutil.which("ctorrent") or ("/usr/bin/ctorrent" if os.access("/usr/bin/ctorrent", os.X_OK) else None)
    if not path:
        raise ToolMissing("ctorrent is not installed", hint=INSTALL_HINT)
    return path


# ctorrent (dnh3.3.2) listens on the first free port from 2706 down to 2106 unless given -p.
DEFAULT_PORTS = range(2706, 2105, -1)


def free_listen_port(ip: str | None) -> int | None:
    """The port ctorrent would choose by itself (the first free one of DEFAULT_PORTS on ``ip``), or None.

    Why choose it for ctorrent: only with an explicit -p does it set SO_REUSEADDR on its listening socket, which
    its accepted connections inherit; without it, the TIME_WAIT connections of a stopped ctorrent keep its port
    from a replacement (reseed) for a minute, and the tracker would list the old port as a stale downloader.
    ctorrent still moves down to the next free port itself if another process takes this one first.

    A port handed out here is skipped by the next calls until its ctorrent reports listening on it
    (``release_port``) or for ``_HANDED_OUT_FOR`` seconds: two ctorrents started back to back would otherwise get
    the same free port before the first binds it, one would move down by itself, and the tracker would keep the
    announced-but-never-bound port as a stale "incomplete" peer.
    """
    now = time.monotonic()
    with _handed_out_lock:
        for key in [k for k, until in _handed_out.items() if until <= now]:
            del _handed_out[key]
        for port in DEFAULT_PORTS:
            if port in _handed_out:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
                try:
                    probe.bind((ip or "0.0.0.0", port))
                except OSError:
                    continue
            _handed_out[port] = now + _HANDED_OUT_FOR
            return port
    return None


_HANDED_OUT_FOR = 10.0
_handed_out: dict[int, float] = {}  # port -> monotonic time until which free_listen_port skips it
_handed_out_lock = threading.Lock()


def release_port(port: int | None) -> None:
    """The ctorrent given ``port`` is listening (or gone): the probe alone decides about it again."""
    with _handed_out_lock:
        _handed_out.pop(port, None)  # type: ignore[arg-type]


def env_extra_args() -> list[str]:
    """The flags in $DOCKET_CTORRENT_ARGS (shell words); only options, never a torrent or a -s/-b path."""
    words = shlex.split(os.environ.get(EXTRA_ARGS_ENV, ""))
    for i, w in enumerate(words):
        if w in ("-s", "-b", "-d", "-dd", "-X", "-S") or (not w.startswith("-") and (i == 0 or not words[i - 1]
                                                                                        .startswith("-"))):
            raise InvalidRequest(f"{EXTRA_ARGS_ENV}: {w!r} is not allowed",
                                 "give only tuning flags such as -z, -C, -M, -m, -U, -D")
    return words


CtorrentStatus = TorrentStatus  # the engine interface's status, parsed from ctorrent's line


def parse_status_line(line: str) -> CtorrentStatus | None:
    """Parse one ctorrent status line; None for any other output."""
    m = _STATUS_RE.match(line)
    if not m:
        return None
    g = m.groups()
    return CtorrentStatus(
        seeds=int(g[0]), leechers=int(g[1]), swarm=int(g[2]),
        have=int(g[3]), total=int(g[4]), available=int(g[5]),
        downloaded_mb=int(g[6]), uploaded_mb=int(g[7]),
        down_kbps=float(g[8]), up_kbps=float(g[9]),
        tracker_failures=int(g[10]) if g[10] is not None else 0,
        tracker_replies=int(g[11]) if g[11] is not None else 0,
    )


class CtorrentProcess:
    """One ctorrent child (never daemonised: -d would lose the pid). Use as a context manager to always stop it."""

    def __init__(
        self,
        torrent: Path,
        save_as: Path,
        *,
        workdir: Path,
        listen_ip: str | None = None,
        port: int | None = None,
        seed_only: bool = False,
        exit_hours: int = 9999,
        cache_mb: int | None = None,
        max_peers: int | None = None,
        min_peers: int | None = None,
        log_path: Path | None = None,
        extra_args: list[str] | None = None,
        die_with_parent: bool = False,
        pid_file: Path | None = None,
    ) -> None:
        """``die_with_parent``: the kernel kills ctorrent when this process ends (a pull's downloads; never the
        registry's seeders, which outlive the request thread that starts them). ``pid_file``: our pid is written
        there, so a later run can stop an orphan writer of the same file (processes.stop_orphan)."""
        self.torrent = Path(torrent).absolute()
        self.save_as = Path(save_as).absolute()
        self.workdir = Path(workdir).absolute()
        self.listen_ip = listen_ip
        self.port = port
        self.seed_only = seed_only
        self.exit_hours = exit_hours
        self.cache_mb = cache_mb
        self.max_peers = max_peers
        self.min_peers = min_peers
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = list(extra_args or [])
        self.die_with_parent = die_with_parent
        self.pid_file = Path(pid_file) if pid_file else None
        if listen_ip is not None:
            ipv4_address(listen_ip, "listen_ip")  # ctorrent is IPv4 only
        self.bitfield = self.workdir / f"{self.torrent.stem}.bf"

        self.pid: int | None = None
        self.listen_port: int | None = None
        self.status: CtorrentStatus | None = None
        self.completed = threading.Event()
        self.listening = threading.Event()
        self.exited = threading.Event()
        self.started_at: float | None = None
        self.completed_at: float | None = None
        self.tracker_failure: str | None = None  # last "TRACKER FAILURE REASON: ..." text
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._log_file: IO[bytes] | None = None

    # -- command line -----------------------------------------------------------------------------------------
    def args(self) -> list[str]:
        """The argument list (no shell)."""
        a = [find_ctorrent(), "-e", str(int(self.exit_hours)), "-s", str(self.save_as), "-b", str(self.bitfield)]
        if self.listen_ip:
            a += ["-i", self.listen_ip]
        if self.port:
            a += ["-p", str(int(self.port))]
        if self.seed_only:
            a.append("-f")
        if self.cache_mb is not None:
            a += ["-C", str(int(self.cache_mb))]
        if self.max_peers is not None:
            a += ["-M", str(int(self.max_peers))]
        if self.min_peers is not None:
            a += ["-m", str(int(self.min_peers))]
        a += env_extra_args()
        a += self.extra_args
        a.append(str(self.torrent))
        return a

    # -- lifecycle --------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._proc is not None:
            raise RuntimeError("CtorrentProcess already started")
        if not self.torrent.is_file():
            raise InvalidRequest(f"torrent file not found: {self.torrent}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.seed_only and not self.save_as.is_file():
            raise InvalidRequest(f"cannot seed {self.save_as}: file missing")
        self.save_as.parent.mkdir(parents=True, exist_ok=True)
        if self.port is None:
            self.port = free_listen_port(self.listen_ip)
        args = self.args()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed by the reader thread
        log.debug("starting %s", args)
        popen = popen_tied if self.die_with_parent else subprocess.Popen
        try:
            self._proc = popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                cwd=self.workdir, close_fds=True,
            )
        except OSError as exc:
            if self._log_file:
                self._log_file.close()
                self._log_file = None
            raise ServiceUnavailable(f"cannot start ctorrent: {exc}", hint=_start_hint(exc)) from exc
        self.pid = self._proc.pid
        if self.pid_file is not None:
            try:
                record_pid(self.pid_file, self.pid)
            except OSError as exc:
                log.warning("cannot record ctorrent pid %d in %s: %s", self.pid, self.pid_file, exc)
        self.started_at = time.monotonic()
        self._reader = threading.Thread(target=self._read, name=f"ctorrent-{self.pid}", daemon=True)
        self._reader.start()
        log.info("ctorrent pid %d started for %s (%s)", self.pid, self.torrent.name,
                 "seed" if self.seed_only else "download")

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        out = self._proc.stdout
        buf = b""
        try:
            while True:
                chunk = out.read1(65536)
                if not chunk:
                    break
                if self._log_file:
                    try:
                        self._log_file.write(chunk)
                        self._log_file.flush()
                    except OSError:
                        pass
                buf += chunk
                parts = re.split(rb"[\r\n]", buf)
                buf = parts.pop()
                if len(buf) > 65536:  # no terminator for a long time: do not grow without bound
                    parts.append(buf)
                    buf = b""
                for raw in parts:
                    self._line(raw)
            if buf:
                self._line(buf)
        except (OSError, ValueError):
            pass
        finally:
            if self.listen_port is None:
                release_port(self.port)  # it never bound the port handed to it
            try:
                self._proc.wait()
            finally:
                if self._log_file:
                    try:
                        self._log_file.close()
                    except OSError:
                        pass
                self.exited.set()

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").strip()
        if not line:
            return
        status = parse_status_line(line)
        if status is not None:
            with self._lock:
                self.status = status
                self._push(line)
            return
        with self._lock:
            self._push(line)
        if line.startswith(_COMPLETE):
            self.completed_at = time.monotonic()
            self.completed.set()
            log.info("ctorrent pid %s: download complete (%s)", self.pid, self.torrent.name)
            return
        if line.startswith(_TRACKER_FAILURE):
            reason = line[len(_TRACKER_FAILURE):].strip()
            if reason != self.tracker_failure:
                log.warning("ctorrent pid %s: tracker refused announce: %r", self.pid, reason)  # %r: remote text
            self.tracker_failure = reason
            return
        m = _LISTEN_RE.search(line)
        if m:
            self.listen_port = int(m.group(2))
            self.listening.set()
            release_port(self.port)
        log.debug("ctorrent %s: %s", self.pid, line)

    def _push(self, line: str) -> None:
        # Collapse the once-a-second status lines so they do not push real messages out of the tail.
        if self._lines and line[:1] in "-\\|/" and self._lines[-1][:1] in "-\\|/" and parse_status_line(self._lines[-1]):
            self._lines[-1] = line
        else:
            self._lines.append(line)

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def wait_listening(self, timeout: float) -> int:
        """Wait for "Listening on IP:PORT"; return the real port (ctorrent tries lower ports when busy)."""
        deadline = time.monotonic() + timeout
        while not self.listening.wait(0.05):
            if self.exited.is_set() or (self._proc is not None and self._proc.poll() is not None):
                self._join_reader(1.0)
                if self.listening.is_set():
                    break
                raise ServiceUnavailable(f"ctorrent exited before listening: {self._tail_text()}")
            if time.monotonic() > deadline:
                raise ServiceUnavailable(f"ctorrent did not start listening within {timeout}s: {self._tail_text()}")
        assert self.listen_port is not None
        return self.listen_port

    def wait_complete(self, timeout: float) -> bool:
        """True once "Download complete." was printed; False on timeout or if ctorrent exited without it."""
        deadline = time.monotonic() + timeout
        while not self.completed.wait(0.1):
            if self.exited.is_set():
                return self.completed.is_set()
            if time.monotonic() > deadline:
                return False
        return True

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, wait, SIGTERM again, wait, SIGKILL; only our own pid. Idempotent and thread-safe.

        A clean exit (with the "stopped" announce that removes us from the tracker) can take up to ~15 s after a
        recent announce; pass timeout=20 when that matters, else the tracker keeps a stale peer for ~30 min.
        """
        with self._stop_lock:
            proc = self._proc
            if proc is None or self._stopped:
                return
            self._stopped = True
            # A second SIGTERM is expected to be needed after a recent announce: ctorrent sits in "Quitting"
            # until ~15 s after its last tracker contact before it sends "stopped" (see INTERFACE.md Findings).
            stop_child(proc, timeout, (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL))
            self._join_reader(5.0)
            log.info("ctorrent pid %d stopped", proc.pid)

    def reseed(self, timeout: float = 5.0) -> CtorrentProcess:
        """Replace this finished download with a fresh seeding process (-f) on the same address and port.

        Why: a ctorrent that finishes keeps the choking it chose as a downloader until its next unchoke round,
        every 10 s from its start; pulls started together have those rounds at the same moments, so a host that
        every peer choked at one round waited up to 10 s with 15 finished peers idle (benchmarks/README.md,
        "Stragglers"). A new process connects to the whole swarm again, and each peer still downloading asks it
        for data ("interested"), which ctorrent answers at once while it has fewer than 4 peers unchoked.
        The old process is halted (``halt``); the new one announces the same address and port as complete.
        """
        if not self.completed.is_set():
            raise RuntimeError("reseed() needs a finished download")
        port = self.halt(timeout)
        new = CtorrentProcess(self.torrent, self.save_as, workdir=self.workdir, listen_ip=self.listen_ip, port=port,
                              seed_only=True, exit_hours=self.exit_hours, cache_mb=self.cache_mb,
                              max_peers=self.max_peers, min_peers=self.min_peers, log_path=self.log_path,
                              extra_args=self.extra_args, die_with_parent=self.die_with_parent,
                              pid_file=self.pid_file)
        new.completed_at = self.completed_at
        new.completed.set()  # a seeder has every piece; -f prints no "Download complete."
        new.start()
        log.info("ctorrent pid %s replaced by seeder pid %s for %s", self.pid, new.pid, self.torrent.name)
        return new

    def halt(self, timeout: float = 5.0) -> int | None:
        """Stop at once, without the "stopped" announce, for a replacement on the same address and port (a
        seeder of ours, here or in the background seeder); returns that port.

        Two SIGTERMs in a row make ctorrent close every connection, save its bitfield and exit without waiting
        for the tracker, whose entry for our address and port the replacement's announce then turns complete.
        """
        port = self.listen_port or self.port
        with self._stop_lock:
            proc = self._proc
            if proc is None or self._stopped:
                raise RuntimeError("halt() of a stopped ctorrent")
            self._stopped = True
            stop_child(proc, timeout, (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL), gap=0.05)
            self._join_reader(5.0)
        return port

    def _claim(self) -> subprocess.Popen[bytes] | None:
        """Mark this process as being stopped by the caller; its Popen, or None when someone else stops it."""
        with self._stop_lock:
            if self._proc is None or self._stopped:
                return None
            self._stopped = True
            return self._proc

    def _join_reader(self, timeout: float) -> None:
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    def tail(self, n: int = 20) -> list[str]:
        with self._lock:
            return list(self._lines)[-n:]

    def _tail_text(self, n: int = 10) -> str:
        return " | ".join(self.tail(n)) or "(no output)"

    def __enter__(self) -> CtorrentProcess:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<CtorrentProcess pid={self.pid} {self.torrent.name} ip={self.listen_ip} port={self.listen_port}>"


def _start_hint(exc: OSError) -> str:
    """What to do when ctorrent cannot be started: only a missing program means "install it"."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return "too many open files: raise the limit (ulimit -n) or pull fewer layers at once"
    if exc.errno in (errno.EAGAIN, errno.ENOMEM):
        return "the system cannot start more processes or threads right now (ulimit -u, memory); retry"
    if exc.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):
        return INSTALL_HINT
    return f"{exc.strerror or exc}; check the system's limits and the ctorrent installation"


def stop_many(procs: Sequence[CtorrentProcess], timeout: float = 5.0) -> None:
    """Stop many ctorrents from the calling thread, all at once (processes.stop_children): no thread per process,
    so it works when no new thread can be started (the cleanup of a pull that ran out of them)."""
    claimed = [(p, popen) for p in procs if (popen := p._claim()) is not None]
    stop_children([popen for _, popen in claimed], timeout)
    for p, popen in claimed:
        p._join_reader(1.0)
        log.info("ctorrent pid %d stopped", popen.pid)

