"""Blob scrubbing: re-hash every stored blob so bytes that changed behind the registry's back are caught.

Blobs are immutable and named by their sha256, so a blob whose file no longer hashes to its name (disk rot, an
operator's mistake, a same-size overwrite that /healthz's stat check cannot see) must stop being served: peers
would get pieces that fail their hash check, and plain-HTTP clients bytes that fail theirs. A pass runs once in
the background at start-up and then every ``--scrub-interval`` seconds (0 disables it). Hashing reads 1 MiB at a
time in its own thread and holds no lock while it reads, so requests are never blocked by it.

A blob found corrupt or missing is recorded here (in memory: the next start-up pass finds it again), its seeder
is stopped and its info hash leaves the tracker whitelist; /healthz names it, and GET of the blob (or its
torrent) answers 503 BLOB_CORRUPT. Re-uploading the right bytes (a push of an image that has the layer) replaces
the file and clears the mark.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import asdict, dataclass
from typing import IO, Any

from sqlalchemy import select

from docket.errors import DocketError
from docket.registry.db import Database
from docket.registry.locks import Locks
from docket.registry.models import Blob
from docket.registry.periodic import Periodic
from docket.registry.store import BlobStore
from docket.registry.swarm import Swarm

log = logging.getLogger(__name__)
CHUNK = 1024 * 1024


class BlobCorrupt(DocketError):
    """A stored blob no longer matches its digest (or vanished): it is not served until repaired."""

    status, code, exit_code = 503, "BLOB_CORRUPT", 6


@dataclass(frozen=True)
class Damage:
    digest: str
    reason: str  # "missing" | "digest mismatch (got sha256:...)"
    detected_at: float  # time.time()


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
                 interval: float = 3600.0) -> None:
        self.db = db
        self.store = store
        self.locks = locks
        self.swarm = swarm
        self.interval = interval
        self._damaged: dict[str, Damage] = {}
        self._lock = threading.Lock()
        self._pass_lock = threading.Lock()  # one pass at a time (background and admin trigger)
        self._worker = Periodic("blob-scrub", interval, self.run_once, first_at_start=True)
        self._stop = self._worker.stopping
        self.passes = 0
        self.last_pass: dict[str, Any] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    # -- state ----------------------------------------------------------------------------------------------
    def damaged(self) -> dict[str, Damage]:
        with self._lock:
            return dict(self._damaged)

    def check_servable(self, digest: str) -> None:
        """Raise BlobCorrupt when the last scrub found ``digest`` damaged."""
        with self._lock:
            damage = self._damaged.get(digest)
        if damage is not None:
            raise BlobCorrupt(f"blob {digest} is corrupt on the registry ({damage.reason}); it is not served",
                              "the registry operator must restore it: push an image that contains it again "
                              "(or restore the file), then the next scrub or push clears it; see /healthz")

    def clear(self, digest: str) -> None:
        """The blob's file was replaced with verified bytes (a new upload)."""
        with self._lock:
            if self._damaged.pop(digest, None) is not None:
                log.info("scrub: blob %s repaired by a new upload", digest)

    def is_damaged(self, digest: str) -> bool:
        with self._lock:
            return digest in self._damaged

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
        known = {d for d, _ in rows}
        with self._lock:
            for digest in [d for d in self._damaged if d not in known]:
                del self._damaged[digest]  # deleted by GC meanwhile
        checked, scanned_bytes = 0, 0
        for digest, size in rows:
            if self._stop.is_set():
                break
            reason = self._check(digest)
            checked += 1
            scanned_bytes += size
            if reason is None:
                if self.is_damaged(digest):
                    self._recover(digest)
                continue
            self._confirm(digest, reason)
        self.passes += 1
        self.last_pass = {"started_at": started, "seconds": round(time.monotonic() - t0, 3), "checked": checked,
                          "bytes": scanned_bytes, "corrupt": sorted(self.damaged())}
        log.log(logging.ERROR if self._damaged else logging.INFO, "scrub: %d blob(s), %d bytes checked in %.1fs; "
                "%d corrupt or missing", checked, scanned_bytes, self.last_pass["seconds"], len(self._damaged))
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
            with self._lock:
                new = digest not in self._damaged
                self._damaged[digest] = Damage(digest, reason2, time.time())
            if new:
                log.error("scrub: blob %s is %s; no longer served or seeded", digest, reason2)
            self.swarm.unseed(digest, info_hash)  # peers must not be fed bad pieces

    def _recover(self, digest: str) -> None:
        """A blob marked damaged hashes right again (file restored by hand): serve and seed it again."""
        with self.locks.blob(digest):
            self.clear(digest)
            with self.db.session() as s:
                blob = s.get(Blob, digest)
                info_hash = blob.info_hash if blob is not None and blob.seeded else None
            if info_hash is not None:
                self.swarm.reseed(digest, info_hash)
        log.info("scrub: blob %s hashes right again; serving and seeding it", digest)
