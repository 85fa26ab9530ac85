"""The background seeder as a pull and ``docket seed`` see it: hand finished blobs over, read its state, stop it.

Why a background seeder: a deploy runs ``docket pull app:v2 && docker run app:v2``; the pull returns once the
image is usable, and what it downloaded goes on seeding for the other hosts in a detached process (seedd.py) that
outlives the command. There is one per cache location (``--location``) on a host; every pull of that location
hands its finished blobs to it (and starts it when none runs).

Its files, under ``<location>/seeder/``:

- ``lock``: flock held by the running seeder for its whole life (free: none runs).
- ``pid``: its pid. ``state.json``: what it seeds (``docket seed --list``). ``seeder.log``: its log.
- ``inbox/``: requests, one JSON file each (written to a dot-name, then renamed), read and removed in name order:
  ``{"op": "seed", ...}`` a finished blob; ``{"op": "drop", "digests": [...]}`` stop seeding those;
  ``{"op": "attach", "pid": N}`` stay up while pull N runs (it is about to hand blobs over).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from docket import errors
from docket.client.cache import atomic_write, cache_dir

log = logging.getLogger(__name__)
UPLOAD_RATE_ENV = "DOCKET_MAX_UPLOAD_RATE"  # the background seeder's upload budget (a rate with a unit)

DAEMON_MODULE = "docket.client.seedd"
SPAWN_EVERY = 1.0  # seconds between attempts to start a seeder while a request waits
TAKEN_WITHIN = 10.0  # seconds a request may wait in the inbox before the pull gives up on the hand-over


@dataclass
class SeedRequest:
    """One finished blob to seed until ``deadline`` (wall clock), on ``listen_ip``:``port`` (the address and port
    its download announced, so the tracker's entry for them turns complete)."""

    digest: str
    torrent: str
    blob: str
    workdir: str
    deadline: float
    listen_ip: str | None = None
    port: int | None = None
    size: int = 0
    ref: str = ""


class SeederFiles:
    """The paths of one location's background seeder, and the lock that tells whether it runs."""

    def __init__(self, location: Path) -> None:
        self.location = Path(location).absolute()
        self.dir = self.location / "seeder"
        self.lock = self.dir / "lock"
        self.pid = self.dir / "pid"
        self.state = self.dir / "state.json"
        self.log = self.dir / "seeder.log"
        self.inbox = self.dir / "inbox"

    def make(self) -> None:
        cache_dir(self.location, "seeder", "inbox")

    def running(self) -> bool:
        """True while a seeder holds the lock (a free lock: none runs, whatever the pid file says)."""
        try:
            fd = os.open(self.lock, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return True
            raise
        finally:
            os.close(fd)  # closing drops our shared lock, if we got it
        return False

    def daemon_pid(self) -> int | None:
        """The running seeder's pid, checked against /proc (its command line names our module and location)."""
        try:
            pid = int(self.pid.read_text().split()[0])
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        if any(a == DAEMON_MODULE.encode() for a in argv) and str(self.location).encode() in argv:
            return pid
        return None

    def post(self, request: dict[str, Any]) -> Path:
        """A request in the inbox (atomically: the seeder never reads half a file)."""
        self.make()
        path = self.inbox / f"{time.time_ns():020d}-{os.getpid()}-{request['op']}.json"
        atomic_write(path, json.dumps(request).encode())
        return path

    def read_state(self) -> dict[str, Any]:
        """``docket seed --list --json``: the seeder's last state, or ``{"running": false}``."""
        running = self.running()
        state: dict[str, Any] = {}
        if running:
            with contextlib.suppress(OSError, ValueError):
                state = json.loads(self.state.read_text())
        if not isinstance(state, dict):
            state = {}
        state.update(running=running, location=str(self.location))
        state.setdefault("blobs", [])
        if not running:
            state["blobs"] = []
        return state


def spawn(files: SeederFiles, max_upload_rate: int | None = None) -> None:
    """Start a background seeder for ``files.location``, detached: its own session (no Ctrl-C or hang-up from our
    terminal), no inherited pipes (a caller capturing our output must not wait for it). A second one started in
    a race finds the lock taken and exits. ``max_upload_rate`` (bytes/s): the seeder's upload budget for its whole
    life (UPLOAD_RATE_ENV; without it, the one in our environment, if any, is inherited)."""
    files.make()
    env = dict(os.environ)
    if max_upload_rate:
        env[UPLOAD_RATE_ENV] = f"{int(max_upload_rate)}B"
    with open(files.log, "ab") as logf:
        subprocess.Popen([sys.executable, "-m", DAEMON_MODULE, str(files.location)], stdin=subprocess.DEVNULL,
                         stdout=logf, stderr=logf, close_fds=True, start_new_session=True, cwd="/", env=env)


class Handoff:
    """A pull's link to the background seeder of its location.

    ``attach`` when the download starts (the seeder is started if none runs, and stays up while this pull runs:
    its Python start-up overlaps the download instead of delaying the pull's return); ``seed`` for each blob once
    its download finished and was halted; ``withdraw`` when the pull fails or is interrupted (what it handed over
    stops: Ctrl-C stops everything the pull started); ``settle`` before returning (every request taken).
    """

    def __init__(self, location: Path, max_upload_rate: int | None = None) -> None:
        """``max_upload_rate``: the upload budget of a seeder this pull starts (one already running keeps its own)."""
        self.files = SeederFiles(location)
        self.max_upload_rate = max_upload_rate
        self.handed: list[str] = []
        self.posted: list[Path] = []
        self._last_spawn = 0.0

    def attach(self) -> None:
        self.posted.append(self.files.post({"op": "attach", "pid": os.getpid()}))
        self._ensure_running()

    def seed(self, request: SeedRequest) -> None:
        self.handed.append(request.digest)
        self.posted.append(self.files.post({"op": "seed", **asdict(request)}))
        self._ensure_running()

    def drop(self, digests: list[str]) -> None:
        """Stop seeding these (a pull is about to download them again), if a seeder runs."""
        if digests and self.files.running():
            self.files.post({"op": "drop", "digests": digests})

    def withdraw(self) -> None:
        if self.handed:
            with contextlib.suppress(OSError, errors.DocketError):
                self.files.post({"op": "drop", "digests": self.handed})
            self.handed = []

    def settle(self, timeout: float = TAKEN_WITHIN) -> bool:
        """Wait until the seeder took every request we posted (starting it again if it ended meanwhile); False
        when some were never taken (they are removed: nothing would seed them)."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = [p for p in self.posted if p.exists()]
            if not waiting:
                self.posted = []
                return True
            if time.monotonic() >= deadline:
                for p in waiting:
                    with contextlib.suppress(OSError):
                        p.unlink()
                self.posted = []
                return False
            self._ensure_running()
            time.sleep(0.05)

    def _ensure_running(self) -> None:
        now = time.monotonic()
        if now - self._last_spawn >= SPAWN_EVERY and not self.files.running():
            self._last_spawn = now
            spawn(self.files, self.max_upload_rate)


def stop(location: Path, timeout: float = 30.0) -> int | None:
    """Stop the background seeder of ``location`` (SIGTERM to its pid, checked); its pid, or None when none runs.
    Waits until it let go of its lock (its seeders stopped)."""
    files = SeederFiles(location)
    if not files.running():
        return None
    with contextlib.suppress(OSError):
        lines = files.pid.read_text().split()
        if lines[1:2] == ["agent"]:
            raise errors.DocketError(f"docket agent (pid {lines[0]}) seeds {location}: it seeds what its cache holds "
                                     "for as long as it holds it",
                                     "stop the agent to stop its seeding (e.g. `systemctl stop docket-agent`)")
    pid = files.daemon_pid()
    if pid is None:
        raise errors.DocketError(f"a background seeder holds {files.lock} but its pid is unknown",
                                 "it ends by itself at its deadline; or find it with `fuser " f"{files.lock}`")
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while files.running() or Path(f"/proc/{pid}").exists():  # its lock goes a moment before the process
        if time.monotonic() >= deadline:
            raise errors.DocketError(f"the background seeder (pid {pid}) did not stop within {timeout:.0f} s")
        time.sleep(0.05)
    return pid
