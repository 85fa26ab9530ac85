"""The background seeder: one detached process per cache location that seeds what pulls finished downloading.

``python -m docket.client.seedd LOCATION`` (started by a pull: background.spawn). It holds ``seeder/lock`` for its
whole life, takes the requests in ``seeder/inbox`` (background.py describes them) and seeds each blob until its
``SeedPolicy`` (seeding.py) says nobody needs it or its deadline passed. It ends by itself when it seeds nothing
and no attached pull still runs; on SIGTERM (``docket seed --stop``); and when its location is removed (a deleted
cache must not leave processes behind). Its ctorrents die with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from docket.client.background import UPLOAD_RATE_ENV, SeederFiles, SeedRequest
from docket.client.cache import atomic_write
from docket.client.seeding import SeedPolicy, TrackerView
from docket.clicktypes import ByteRate
from docket.torrent.bandwidth import RateLimits
from docket.torrent.ctorrent_engine import CtorrentEngine
from docket.torrent.engine import TorrentEngine, Transfer
from docket.torrent.metainfo import read_torrent
from docket.torrent.ratelimit import HostRates

log = logging.getLogger(__name__)

TICK = 0.1  # seconds between looks at the inbox and the seeders
STATE_EVERY = 1.0  # seconds between writes of state.json
LINGER = 1.0  # seconds idle (nothing seeded, no attached pull) before the seeder ends
MAX_SEEDERS = 64  # blobs seeded at once; the one closest to its deadline stops for a new one
MAX_REQUEST = 64 * 1024  # bytes: a larger inbox file is not ours
STOP_WAIT = 2.0
LOG_LIMIT = 1024 * 1024  # bytes of seeder.log kept from earlier runs
KEEP_FOR = 10 * 365 * 86400.0  # seconds: "as long as it holds it" (an agent's seeder: docket/agent)
RESTART_AFTER = 5.0  # seconds before an agent's seeder whose ctorrent exited is started again
_DIGEST = re.compile(r"\A[a-z0-9]+:[a-f0-9]{32,128}\Z")
_TAKE_LOCK_FOR = 1.0  # a `docket seed --list` probe holds the lock shared for a moment: retry that long


@dataclass
class Seeding:
    request: SeedRequest
    transfer: Transfer
    policy: SeedPolicy
    started: float = field(default_factory=time.time)
    unneeded: bool = False  # the policy said nobody needs it (set by the scrape thread)
    exited_at: float | None = None  # keep mode: when its ctorrent was found dead (restarted RESTART_AFTER later)


class SeedDaemon:
    """The loop of one location's background seeder (``engine`` and ``tracker`` replaceable for tests).

    ``keep``: the seeder of a ``docket agent`` (docket/agent), which seeds everything its cache holds for as long
    as it holds it: no deadline, no scrape policy, no idle end, a ctorrent that exits is started again; a blob
    stops only on a ``drop`` (the agent evicts it, a pull downloads it again) or when its file is gone."""

    def __init__(self, files: SeederFiles, engine: TorrentEngine | None = None, tracker: TrackerView | None = None,
                 scrape_interval: float = 2.0, *, keep: bool = False, max_seeders: int = MAX_SEEDERS) -> None:
        self.files = files
        self.keep = keep
        self.max_seeders = max_seeders
        self.engine = engine or CtorrentEngine(tied=True)
        self.tracker = tracker or TrackerView()
        self.scrape_interval = scrape_interval
        self.seeding: dict[str, Seeding] = {}
        self.attached: set[int] = set()
        self.stopping: list[threading.Thread] = []
        self.finished: list[dict[str, Any]] = []  # the last blobs that stopped, and why (state.json)
        self.term = threading.Event()
        self.idle_since = time.monotonic()
        self._lock_fd: int | None = None
        self._lock_ino = 0
        self._state_at = 0.0

    # -- life ------------------------------------------------------------------------------------------------
    def take_lock(self) -> bool:
        self.files.make()
        fd = os.open(self.files.lock, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + _TAKE_LOCK_FOR
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.02)
        self._lock_fd, self._lock_ino = fd, os.fstat(fd).st_ino
        self.files.pid.write_text(f"{os.getpid()}\n" + ("agent\n" if self.keep else ""))
        return True

    def run(self) -> None:
        log.info("background seeder pid %d for %s", os.getpid(), self.files.location)
        if not self.keep:  # an agent's blobs seed while it holds them: no policy to check
            threading.Thread(target=self._scrape_loop, name="scrapes", daemon=True).start()
        try:
            while not self.term.is_set():
                if self._location_gone():
                    log.warning("%s was removed: stopping every seeder", self.files.location)
                    break
                self._take_requests()
                self._tend()
                self._write_state()
                if self._idle():
                    break
                self.term.wait(TICK)
        finally:
            self._shutdown()

    def _location_gone(self) -> bool:
        try:
            return os.stat(self.files.lock).st_ino != self._lock_ino
        except OSError:
            return True

    def _idle(self) -> bool:
        if self.keep:
            return False
        self.attached = {pid for pid in self.attached if _alive(pid)}
        busy = self.seeding or self.attached or any(t.is_alive() for t in self.stopping) or self._inbox()
        if busy:
            self.idle_since = time.monotonic()
            return False
        return time.monotonic() - self.idle_since >= LINGER

    def _shutdown(self) -> None:
        transfers = [s.transfer for s in self.seeding.values()]
        for digest in list(self.seeding):
            self._finish(digest, "the background seeder stopped")
        if transfers:
            self.engine.stop_all(transfers, STOP_WAIT)
        for t in self.stopping:
            t.join(STOP_WAIT * 3 + 10)
        with contextlib.suppress(OSError):
            self.files.state.unlink()
        with contextlib.suppress(OSError):
            self.files.pid.unlink()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # the lock goes with it: `docket seed --stop` returns
        log.info("background seeder pid %d ended", os.getpid())

    # -- requests --------------------------------------------------------------------------------------------
    def _inbox(self) -> list[Path]:
        try:
            return sorted(p for p in self.files.inbox.iterdir() if not p.name.startswith("."))
        except OSError:
            return []

    def _take_requests(self) -> None:
        for path in self._inbox():
            try:
                raw = path.read_bytes()[:MAX_REQUEST + 1]
                path.unlink()
                request = json.loads(raw) if len(raw) <= MAX_REQUEST else None
            except (OSError, ValueError) as exc:
                log.warning("unreadable request %s: %s", path.name, exc)
                continue
            try:
                self._apply(request)
            except (KeyError, TypeError, ValueError, OSError) as exc:
                log.warning("request %s refused: %s", path.name, exc)

    def _apply(self, request: Any) -> None:
        op = request.get("op") if isinstance(request, dict) else None
        if op == "attach":
            self.attached.add(int(request["pid"]))
        elif op == "drop":
            for digest in request["digests"]:
                if digest in self.seeding:
                    self._stop(digest, "a pull downloads it again")
        elif op == "seed":
            self._seed(SeedRequest(**{k: v for k, v in request.items() if k != "op"}))
        else:
            raise ValueError(f"unknown op {op!r}")

    def _seed(self, req: SeedRequest) -> None:
        if not _DIGEST.match(req.digest):
            raise ValueError(f"bad digest {req.digest!r}")
        for path in (req.torrent, req.blob, req.workdir):  # only files of this location are seeded
            if not Path(path).resolve().is_relative_to(self.files.location.resolve()):
                raise ValueError(f"{path} is outside {self.files.location}")
        seed_for = KEEP_FOR if self.keep else req.deadline - time.time()
        current = self.seeding.get(req.digest)
        if current is not None and current.transfer.alive():
            current.policy.deadline = max(current.policy.deadline, time.monotonic() + seed_for)
            current.request.deadline = max(current.request.deadline, req.deadline)
            return
        if seed_for <= 0:
            return
        if len(self.seeding) >= self.max_seeders:
            self._stop(min(self.seeding, key=lambda d: self.seeding[d].request.deadline), "too many seeders")
        meta = read_torrent(Path(req.torrent).read_bytes())
        transfer = self._start(req)
        policy = SeedPolicy(self.tracker, meta, time.monotonic(), seed_for, self.scrape_interval)
        self.seeding[req.digest] = Seeding(req, transfer, policy)
        self._state_at = 0.0  # written at once
        log.info("seeding %s (%s) on %s:%s for up to %.0f s", req.digest, req.ref or "?",
                 req.listen_ip or "*", req.port or "?", seed_for)

    def _start(self, req: SeedRequest) -> Transfer:
        return self.engine.seed(Path(req.torrent), Path(req.blob), workdir=Path(req.workdir),
                                listen_ip=req.listen_ip, port=req.port, log_path=Path(req.workdir) / "seed.log")

    # -- seeders ---------------------------------------------------------------------------------------------
    def _tend(self) -> None:
        for digest, s in list(self.seeding.items()):
            if self.keep and not s.transfer.alive():
                self._restart(digest, s)
            elif not s.transfer.alive():
                self._finish(digest, "ctorrent exited")
            elif time.monotonic() >= s.policy.deadline:
                self._stop(digest, "its seed time ended")
            elif s.unneeded:
                self._stop(digest, "no peer still downloads it")

    def _restart(self, digest: str, s: Seeding) -> None:
        """Keep mode: a ctorrent that exited is started again (on the same address and port) after RESTART_AFTER;
        a blob whose file is gone stops."""
        if not Path(s.request.blob).exists():
            self._finish(digest, "its file is gone")
            return
        now = time.monotonic()
        if s.exited_at is None:
            s.exited_at = now
            log.warning("ctorrent seeding %s exited; starting it again in %.0f s", digest, RESTART_AFTER)
            return
        if now - s.exited_at < RESTART_AFTER:
            return
        s.exited_at = None
        try:
            s.transfer = self._start(s.request)
        except Exception as exc:  # noqa: BLE001 - tried again after RESTART_AFTER
            s.exited_at = now
            log.warning("could not start seeding %s again: %s", digest, exc)

    def _scrape_loop(self) -> None:
        """The policies' tracker scrapes, apart from the main loop: a dead tracker (2 s per scrape) must not keep
        requests waiting in the inbox."""
        while not self.term.is_set():
            for s in list(self.seeding.values()):
                if not s.unneeded and s.policy.done():
                    s.unneeded = True
            self.term.wait(TICK * 2)

    def _stop(self, digest: str, why: str) -> None:
        s = self._finish(digest, why)

        def stop() -> None:
            with contextlib.suppress(Exception):
                s.transfer.stop(timeout=STOP_WAIT)

        thread = threading.Thread(target=stop, name=f"stop-{digest[7:19]}", daemon=True)
        thread.start()
        self.stopping = [t for t in self.stopping if t.is_alive()] + [thread]

    def _finish(self, digest: str, why: str) -> Seeding:
        s = self.seeding.pop(digest)
        log.info("stopped seeding %s: %s", digest, why)
        self.finished = (self.finished + [{"digest": digest, "ref": s.request.ref, "why": why,
                                           "stopped_at": time.time(), "started_at": s.started}])[-32:]
        self._state_at = 0.0  # written at once
        return s

    def _write_state(self) -> None:
        now = time.monotonic()
        if now - self._state_at < STATE_EVERY:
            return
        self._state_at = now
        blobs = []
        for digest, s in self.seeding.items():
            st = s.transfer.status
            blobs.append({"digest": digest, "ref": s.request.ref, "size": s.request.size,
                          "peer": f"{s.request.listen_ip or '*'}:{s.transfer.listen_port or s.request.port or '?'}",
                          "pid": s.transfer.pid, "since": s.started,
                          "seconds_left": None if self.keep else round(max(0.0, s.policy.deadline - now), 1),
                          "uploaded_mb": st.uploaded_mb if st else 0, "peers": st.leechers if st else 0})
        state = {"pid": os.getpid(), "updated": time.time(), "blobs": blobs, "attached": sorted(self.attached),
                 "finished": self.finished, "agent": self.keep}
        with contextlib.suppress(OSError):
            atomic_write(self.files.state, json.dumps(state).encode())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def upload_rate_from_env() -> int | None:
    """The upload budget the pull that started us gave (background.spawn), or None: unlimited."""
    text = os.environ.get(UPLOAD_RATE_ENV)
    if not text:
        return None
    try:
        return ByteRate().convert(text, None, None)
    except click.BadParameter as exc:
        raise ValueError(f"{UPLOAD_RATE_ENV}={text!r}: {exc.message}") from exc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m docket.client.seedd LOCATION", file=sys.stderr)
        return 2
    with contextlib.suppress(OSError):  # stderr is seeder.log (background.spawn): keep it small
        if os.fstat(2).st_size > LOG_LIMIT:
            os.ftruncate(2, 0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rates = HostRates(RateLimits(upload=upload_rate_from_env()))
    except ValueError as exc:
        print(f"seedd: {exc}", file=sys.stderr)
        return 2
    daemon = SeedDaemon(SeederFiles(Path(args[0])), engine=CtorrentEngine(tied=True, rates=rates))
    if not daemon.take_lock():
        return 0  # another one runs: it takes the requests
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: daemon.term.set())
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
