"""Blob scrubbing: re-hash every stored blob so bytes that changed behind the registry's back are caught.

Blobs are immutable and named by their sha256, so a blob whose file no longer hashes to its name (disk rot, an
operator's mistake, a same-size overwrite that /healthz's stat check cannot see) must stop being served: peers
would get pieces that fail their hash check, and plain-HTTP clients bytes that fail theirs. A pass runs once in
the background at start-up and then every ``--scrub-interval`` seconds (0 disables it). Hashing reads 1 MiB at a
time in its own thread and holds no lock while it reads, so requests are never blocked by it.

A blob found corrupt or missing is recorded in the database (table ``blob_damage``, so that every registry
instance sharing it refuses the blob: docs/instances.md), its seeder is stopped and its info hash leaves the
tracker whitelist; /healthz names it, and GET of the blob (or its torrent) answers 503 BLOB_CORRUPT. Re-uploading
the right bytes (a push of an image that has the layer) replaces the file and clears the mark; so does a pass that
finds the file hashing right again (restored by hand). The mark outlives a restart: a start-up seeds no damaged
blob. With several instances only the leader's timer scrubs; ``POST /api/v1/admin/scrub`` runs a pass on
whichever instance answers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import IO, Any

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError

from docket.errors import DocketError
from docket.registry.db import Database
from docket.registry.locks import Locks
from docket.registry.models import Blob, BlobDamage, utcnow
from docket.registry.periodic import Periodic
from docket.registry.store import BlobStore
from docket.registry.swarm import Swarm

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024
MARKS_TTL = 2.0  # seconds a read of the damage marks serves blob requests (another instance's mark shows then)


class BlobCorrupt(DocketError):
    """A stored blob no longer matches its digest (or vanished): it is not served until repaired."""

    status, code, exit_code = 503, "BLOB_CORRUPT", 6


@dataclass(frozen=True)
class Damage:
    digest: str
    reason: str  # "missing" | "digest mismatch (got sha256:...)"
    detected_at: float  # seconds since the epoch (the row's detected_at)

    @classmethod
    def of(cls, row: BlobDamage) -> Damage:
        return cls(row.digest, row.reason, row.detected_at.timestamp())


def file_digest(f: IO[bytes], stop: threading.Event | None = None, algorithm: str = "sha256") -> str | None:
    """``<algorithm>:<hex>`` of an open file read 1 MiB at a time; None when asked to stop half-way."""
    h = hashlib.new(algorithm)
    while chunk := f.read(CHUNK):
        h.update(chunk)
        if stop is not None and stop.is_set():
            return None
    return f"{algorithm}:{h.hexdigest()}"


class BlobScrubber:
    def __init__(self, db: Database, store: BlobStore, locks: Locks, swarm: Swarm, *,
                 interval: float = 3600.0, leader: Callable[[], bool] | None = None) -> None:
        """``leader``: the timer's passes run only while it answers True (one instance scrubs)."""
        self.db = db
        self.store = store
        self.locks = locks
        self.swarm = swarm
        self.interval = interval
        self._pass_lock = threading.Lock()  # one pass at a time in this process (background and admin trigger)
        self._worker = Periodic("blob-scrub", interval, self.run_once, first_at_start=True, when=leader)
        self._stop = self._worker.stopping
        self.passes = 0
        self.last_pass: dict[str, Any] | None = None
        self._marks_cache: dict[str, str] | None = None  # see _marks
        self._marks_at = 0.0
        self._marks_lock = threading.Lock()

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    # -- state (rows of blob_damage: every instance sees them) -----------------------------------------------
    def damaged(self) -> dict[str, Damage]:
        with self.db.session() as s:
            return {row.digest: Damage.of(row) for row in s.scalars(select(BlobDamage))}

    def _marks(self) -> dict[str, str]:
        """digest -> reason of every damaged blob, read from the database at most every ``MARKS_TTL`` seconds.
        Every blob request asks: a query of its own there would take a second pooled connection while the
        request's session holds one, and enough such requests at once wait for each other until the pool
        times out. One thread refreshes while the others use what was read last; this process's own marks
        and repairs update it at once."""
        now = time.monotonic()
        if self._marks_cache is not None and now - self._marks_at < MARKS_TTL:
            return self._marks_cache
        if not self._marks_lock.acquire(blocking=self._marks_cache is None):
            return self._marks_cache or {}
        try:
            if self._marks_cache is None or time.monotonic() - self._marks_at >= MARKS_TTL:
                try:
                    with self.db.session() as s:
                        marks = {d: r for d, r in s.execute(select(BlobDamage.digest, BlobDamage.reason))}
                except SQLAlchemyError:
                    if self._marks_cache is None:
                        raise
                    log.warning("scrub: could not re-read the damage marks; using those read %.0f s ago",
                                time.monotonic() - self._marks_at)
                    return self._marks_cache
                self._marks_cache, self._marks_at = marks, time.monotonic()
            return self._marks_cache
        finally:
            self._marks_lock.release()

    def _remember(self, digest: str, reason: str | None) -> None:
        with self._marks_lock:
            if self._marks_cache is not None:
                marks = dict(self._marks_cache)
                if reason is None:
                    marks.pop(digest, None)
                else:
                    marks[digest] = reason
                self._marks_cache = marks

    def check_servable(self, digest: str) -> None:
        """Raise BlobCorrupt when a scrub (on any instance, seen within ``MARKS_TTL``) found ``digest`` damaged."""
        reason = self._marks().get(digest)
        if reason is not None:
            raise BlobCorrupt(f"blob {digest} is corrupt on the registry ({reason}); it is not served",
                              "the registry operator must restore it: push an image that contains it again "
                              "(or restore the file), then the next scrub or push clears it; see /healthz")

    def clear(self, digest: str) -> None:
        """The blob's file was replaced with verified bytes (a new upload)."""
        if self._unmark(digest):
            log.info("scrub: blob %s repaired by a new upload", digest)

    def is_damaged(self, digest: str) -> bool:
        return digest in self._marks()

    def _mark(self, digest: str, reason: str) -> bool:
        """Record the damage (caller holds the blob lock); True when it was not recorded before."""
        with self.db.session() as s:
            row = s.get(BlobDamage, digest)
            if row is None:
                s.add(BlobDamage(digest=digest, reason=reason[:300], detected_at=utcnow()))
            else:
                row.reason = reason[:300]
            s.commit()
        self._remember(digest, reason[:300])
        return row is None

    def _unmark(self, digest: str) -> bool:
        with self.db.session() as s:
            found = s.execute(delete(BlobDamage).where(BlobDamage.digest == digest)).rowcount
            s.commit()
        self._remember(digest, None)
        return bool(found)

    def status(self) -> dict[str, Any]:
        """For /healthz and the admin trigger."""
        return {"interval": self.interval, "passes": self.passes, "last_pass": self.last_pass,
                "corrupt": [asdict(d) for d in sorted(self.damaged().values(), key=lambda d: d.digest)]}

    # -- passes ---------------------------------------------------------------------------------------------
    def run_once(self) -> dict[str, Any]:
        """Hash every blob with a row; mark the damaged ones; returns a summary of the pass."""
        with self._pass_lock:
            return self._pass()

    def _pass(self) -> dict[str, Any]:
        started, t0 = time.time(), time.monotonic()
        with self.db.session() as s:
            rows = list(s.execute(select(Blob.digest, Blob.size)))
            # marks of blobs deleted meanwhile (GC, DELETE): a blob pushed again later starts clean
            s.execute(delete(BlobDamage).where(BlobDamage.digest.not_in(select(Blob.digest))))
            s.commit()
        marked = set(self.damaged())
        checked, scanned_bytes = 0, 0
        for digest, size in rows:
            if self._stop.is_set():
                break
            reason = self._check(digest)
            checked += 1
            scanned_bytes += size
            if reason is None:
                if digest in marked:
                    self._recover(digest)
                continue
            self._confirm(digest, reason)
        corrupt = sorted(self.damaged())
        self.passes += 1
        self.last_pass = {"started_at": started, "seconds": round(time.monotonic() - t0, 3), "checked": checked,
                          "bytes": scanned_bytes, "corrupt": corrupt}
        log.log(logging.ERROR if corrupt else logging.INFO, "scrub: %d blob(s), %d bytes checked in %.1fs; "
                "%d corrupt or missing", checked, scanned_bytes, self.last_pass["seconds"], len(corrupt))
        return self.last_pass

    def _check(self, digest: str) -> str | None:
        """None when the blob file hashes to its digest, else what is wrong."""
        try:
            with self.store.open(digest) as f:
                got = file_digest(f, self._stop, digest.partition(":")[0])
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        if got is None or got == digest:
            return None
        return f"digest mismatch (the file hashes to {got})"

    def _confirm(self, digest: str, reason: str) -> None:
        """Under the blob's lock: still a row (not GC'd meanwhile), still bad (not re-uploaded) -> mark it."""
        with self.locks.blob(digest):
            with self.db.session() as s:
                blob = s.get(Blob, digest)
                if blob is None:
                    return
                info_hash = blob.info_hash
            reason2 = self._check(digest)
            if reason2 is None:
                return
            if self._mark(digest, reason2):
                log.error("scrub: blob %s is %s; no longer served or seeded", digest, reason2)
            self.swarm.unseed(digest, info_hash)  # peers must not be fed bad pieces

    def _recover(self, digest: str) -> None:
        """A blob marked damaged hashes right again (file restored by hand): serve and seed it again."""
        with self.locks.blob(digest):
            self._unmark(digest)
            with self.db.session() as s:
                blob = s.get(Blob, digest)
                info_hash = blob.info_hash if blob is not None and blob.seeded else None
            if info_hash is not None:
                self.swarm.reseed(digest, info_hash)
        log.info("scrub: blob %s hashes right again; serving and seeding it", digest)
