"""Seeder supervisor: one seeding transfer (a ``ctorrent`` process by default) per stored blob, kept alive.

A plain class (no Flask): its own thread wakes about once a second, restarts dead seeders with backoff (the first
restart is immediate, so a killed seeder is back within ~1-2 s), and restarts a managed tracker that died followed
by every seeder (a fresh tracker has an empty peer table). ``stop()`` stops the thread, then every seeder.
The BitTorrent engine (docket/torrent/engine.py) is given to the constructor. Each seeder has its own working
directory under ``<location>/seeders/<hex>/`` where the engine records its pid, so that a registry that was killed
with SIGKILL stops its previous seeders at the next start (``reap_orphans``) instead of leaving them running.
Instances sharing a location (docs/instances.md) each seed from ``seeders/<instance id>/<hex>/`` (ctorrent's
bitfield files must not be shared); ``reap_dirs`` stops and removes those of instances gone.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from docket.registry.periodic import Periodic
from docket.torrent.ctorrent import CtorrentProcess
from docket.torrent.bandwidth import RateLimits
from docket.torrent.ctorrent_engine import CtorrentEngine
from docket.torrent.engine import TorrentEngine, Transfer
from docket.torrent.ratelimit import HostRates

log = logging.getLogger(__name__)

INSTANCE_ID_LEN = 32  # seeders/<instance id>/ (a uuid4's hex) when instances share the location
STABLE_AFTER = 30.0  # a seeder that ran this long resets its failure count
MAX_BACKOFF = 30.0


class SupervisedTracker(Protocol):
    def needs_restart(self) -> bool: ...
    def restart(self) -> None: ...


@dataclass
class SeedSpec:
    digest: str
    torrent: Path
    blob: Path
    workdir: Path


@dataclass
class _Seeder:
    spec: SeedSpec
    proc: Transfer | None = None
    started_at: float = 0.0
    failures: int = 0
    restarts: int = 0
    next_start: float = 0.0
    last_error: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class SupervisorStats:
    """Counts since start (read by /metrics)."""

    restarts: int = 0  # seeders started again: died, tracker restarted, re-announced


class SeederSupervisor:
    """Owns every seeding ctorrent of this registry process."""

    def __init__(
        self,
        *,
        listen_ip: str,
        tracker: SupervisedTracker | None = None,
        interval: float = 1.0,
        process_factory: Callable[..., Any] = CtorrentProcess,
        engine: TorrentEngine | None = None,
        max_upload_rate: int | None = None,
    ) -> None:
        """``engine``: the BitTorrent engine seeding (default: ctorrent, its processes made by
        ``process_factory``, which tests replace). ``max_upload_rate``: bytes/s for all the seeders together
        (the default engine's ctorrents share one budget: docket/torrent/ratelimit.py)."""
        self.listen_ip = listen_ip
        self.tracker = tracker
        self.interval = interval
        self.rates = HostRates(RateLimits(upload=max_upload_rate))
        self.engine = engine or CtorrentEngine(process_factory=process_factory, rates=self.rates)
        self._table: dict[str, _Seeder] = {}
        self._lock = threading.Lock()
        self.stats = SupervisorStats()
        self._worker = Periodic("seeder-supervisor", interval, self.tick)
        self._stop = self._worker.stopping

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        """Stop watching, then stop every seeder (in parallel: each may take a few seconds)."""
        self._worker.stop()
        with self._lock:
            seeders = list(self._table.values())
            self._table.clear()
        stoppers = [threading.Thread(target=self._stop_one, args=(s,), daemon=True) for s in seeders]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(timeout=60)
        self.rates.close()

    def tick(self) -> None:
        """One round: tracker first (seeders announce to it), then every seeder."""
        if self.tracker is not None and self.tracker.needs_restart():
            self.tracker.restart()
            self.restart_all()
            return
        now = time.monotonic()
        with self._lock:
            seeders = list(self._table.values())
        for s in seeders:
            if self._stop.is_set():
                return
            proc = s.proc
            if proc is not None and proc.alive():
                continue
            if proc is not None:  # it died: note it once, schedule the restart
                ran = now - s.started_at
                s.failures = s.failures + 1 if ran < STABLE_AFTER else 1
                s.next_start = now + _backoff(s.failures)
                self._restarted(s)
                s.last_error = f"exited after {ran:.0f}s"
                log.warning("seeder for %s (pid %s) exited after %.0fs; restarting in %.0fs. last output: %s",
                            s.spec.digest, proc.pid, ran, s.next_start - now,
                            "; ".join(_safe_tail(proc)) or "(none)")
                with s.lock:
                    if s.proc is proc:
                        s.proc = None
            if now >= s.next_start:
                self._start_one(s)

    # -- table ----------------------------------------------------------------------------------------------
    def ensure(self, spec: SeedSpec, wait_listening: float = 5.0) -> bool:
        """Seed ``spec.digest`` if not already seeded. With ``wait_listening``, wait until ctorrent listens and
        return whether it does; without, return whether it was started (the watcher retries failures)."""
        with self._lock:
            s = self._table.get(spec.digest)
            if s is None:
                s = _Seeder(spec)
                self._table[spec.digest] = s
        if s.proc is None or not s.proc.alive():
            self._start_one(s)
        proc = s.proc
        if proc is None:
            return False
        if wait_listening:
            try:
                proc.wait_listening(wait_listening)
            except Exception as exc:  # noqa: BLE001 - reported through the return value
                s.last_error = str(exc)
                return False
        return bool(proc.alive())

    def remove(self, digest: str) -> None:
        with self._lock:
            s = self._table.pop(digest, None)
        if s is not None:
            self._stop_one(s)

    def restart_all(self) -> None:
        with self._lock:
            seeders = list(self._table.values())
        log.info("restarting all %d seeder(s)", len(seeders))
        # in parallel, as in stop(): a seeder that uploaded recently ignores SIGTERM for its 5 s grace, and one
        # after another they kept the last seeder away from the (restarted) tracker for 5 s per seeder
        stoppers = [threading.Thread(target=self._stop_one, args=(s,), kwargs={"forget": False}, daemon=True)
                    for s in seeders]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join(timeout=60)
        for s in seeders:
            self._restarted(s)
            self._start_one(s)

    def reannounce(self, digests: list[str]) -> None:
        """Restart these seeders so each announces again now (their first announce was refused by an external
        tracker that had not whitelisted them yet; ctorrent retries only every ~15 s). In the background: a
        ctorrent that contacted the tracker recently takes its 5 s SIGTERM grace to stop. A leecher that announced
        meanwhile is in the new seeder's first peer list, which it connects to at once."""
        with self._lock:
            seeders = [self._table[d] for d in digests if d in self._table]

        def restart(s: _Seeder) -> None:
            self._stop_one(s)
            self._restarted(s)
            self._start_one(s)

        for s in seeders:
            threading.Thread(target=restart, args=(s,), name=f"reannounce-{s.spec.digest[-12:]}", daemon=True).start()

    def digests(self) -> list[str]:
        with self._lock:
            return sorted(self._table)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Per-digest state for healthz and admin listings."""
        with self._lock:
            seeders = list(self._table.values())
        out: dict[str, dict[str, Any]] = {}
        for s in seeders:
            proc = s.proc
            alive = bool(proc is not None and proc.alive())
            status = getattr(proc, "status", None) if proc is not None else None
            out[s.spec.digest] = {
                "pid": getattr(proc, "pid", None) if alive else None,
                "alive": alive,
                "listen_port": getattr(proc, "listen_port", None) if alive else None,
                "restarts": s.restarts,
                "uploaded_mb": getattr(status, "uploaded_mb", None),
                "peers": getattr(status, "leechers", None),
                "error": s.last_error,
            }
        return out

    def _restarted(self, s: _Seeder) -> None:
        with self._lock:  # restarts happen in several threads (re-announces)
            s.restarts += 1
            self.stats.restarts += 1

    # -- processes ------------------------------------------------------------------------------------------
    def _start_one(self, s: _Seeder) -> None:
        with s.lock:
            if s.proc is not None and s.proc.alive():
                return
            with self._lock:
                current = self._table.get(s.spec.digest) is s
            if not current:  # removed (or everything stopped) while a restart was under way: it would be orphaned
                return
            spec = s.spec
            try:
                spec.workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
                proc = self.engine.seed(spec.torrent, spec.blob, workdir=spec.workdir, listen_ip=self.listen_ip)
            except Exception as exc:  # noqa: BLE001 - retried with backoff by the watcher
                s.failures += 1
                s.last_error = str(exc)
                s.next_start = time.monotonic() + _backoff(s.failures)
                log.error("cannot start seeder for %s: %s", spec.digest, exc)
                return
            s.proc = proc
            s.started_at = time.monotonic()
            s.last_error = None
            log.info("seeding %s (pid %s on %s)", spec.digest, proc.pid, self.listen_ip)

    def _stop_one(self, s: _Seeder, forget: bool = True) -> None:
        with s.lock:
            proc = s.proc
            if proc is not None:
                try:
                    proc.stop()
                except Exception:  # noqa: BLE001
                    log.exception("stopping seeder for %s", s.spec.digest)
            if forget:
                s.proc = None
                with contextlib.suppress(OSError):
                    self.engine.forget(s.spec.workdir)


def _backoff(failures: int) -> float:
    """0 s for the first failure, then 1, 2, 4 ... up to 30 s."""
    return 0.0 if failures <= 1 else min(2.0 ** (failures - 2), MAX_BACKOFF)


def _safe_tail(proc: Any) -> list[str]:
    try:
        return list(proc.tail(5))
    except Exception:  # noqa: BLE001
        return []


def reap_orphans(seeders_dir: Path, engine: TorrentEngine | None = None) -> int:
    """Stop the seeders a previous registry run started and could not stop (it was SIGKILLed).

    Only pids the engine recorded in a seeder's work directory, still running its program on a torrent of
    this location (the directory's name in the command line), are signalled.
    """
    if not seeders_dir.is_dir():
        return 0
    engine = engine or CtorrentEngine()
    return sum(engine.reap(d, marker=d.name) for d in seeders_dir.iterdir() if d.is_dir())


def reap_dirs(root: Path, keep: set[str], engine: TorrentEngine | None = None) -> list[str]:
    """Registry instances sharing a location (docs/instances.md) seed from ``<root>/<instance id>/<hex>/``: stop
    the seeders recorded under every directory of ``root`` not named in ``keep`` (instances gone; the
    ``<hex>`` directories of a one-instance run) and remove it. The marker is the work directory's whole path,
    which only that directory's own ctorrent has in its command line (``-b <dir>/<hex>.bf``): never a seeder of a
    live instance of the same blob. Returns the names removed."""
    if not root.is_dir():
        return []
    engine = engine or CtorrentEngine()
    removed = []
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name in keep:
            continue
        workdirs = [w for w in d.iterdir() if w.is_dir()] if len(d.name) == INSTANCE_ID_LEN else [d]
        for w in workdirs:
            with contextlib.suppress(OSError):
                engine.reap(w, marker=str(w))
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d.name)
    return removed
