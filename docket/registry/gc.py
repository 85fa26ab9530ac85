"""Garbage collection of blobs no tag references any more.

A blob is referenced while any image uses it as its whole tarball, its config or one of its layers, or a V2
manifest row is stored in it or lists it as config or layer (docs/v2.md). Each pass first drops the manifests
docket wrote for ``docket push`` tags that are gone (origin "docket", untagged, listed by no index in their
repository); manifests pushed through /v2 stay until ``DELETE /v2/<name>/manifests/<digest>``, as the spec expects.
A blob is deleted only when all of these hold: it has been unreferenced for longer than the grace period
(``--gc-grace``, at least MIN_GRACE), it did not become unreferenced during the push activity still going on
(``uploads.PushActivity``: a push uploads its blobs, then the manifest that references them, however long that
takes), no plain-HTTP download of it is in flight on any live instance (``blob_leases``), and the tracker reports no incomplete peers for it (someone
still downloading over BitTorrent needs our seeder). Those last two waits are bounded by ``max_wait``: anyone can
announce an info hash to the tracker, and an announce or a trickled download must not pin a blob forever (a
download already running keeps the file it opened). Then, under the blob's lock: stop its seeder,
remove it from the whitelist, delete the DB row (committed), then the files. A crash between the row and the
files leaves orphan files, which start-up adopts as unreferenced rows (it never deletes them); the reverse order
could leave rows pointing at nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from docket.errors import InvalidRequest
from docket.registry.blobs import Blobs, DownloadCounter
from docket.registry.db import Database
from docket.registry.instances import Instances
from docket.registry.locks import Locks
from docket.registry.manifests import Manifests
from docket.registry.models import Blob, utcnow
from docket.registry.periodic import Periodic
from docket.registry.swarm import Swarm
from docket.registry.uploads import UploadSessions

log = logging.getLogger(__name__)

MIN_GRACE = 60.0  # seconds: shorter, and a blob could go between a client's HEAD (or upload) and its manifest
MAX_WAIT = 3600.0  # seconds GC waits for downloads (HTTP or the swarm) of a blob it may delete


def check_grace(grace: float) -> float:
    """``--gc-grace`` below MIN_GRACE is refused up front (a grace of 0 let GC delete a blob between its upload
    and the manifest that references it, failing the push)."""
    if grace < MIN_GRACE:
        raise InvalidRequest(f"--gc-grace {grace:g} is shorter than a push can take: GC could delete a blob "
                             "between its upload and the manifest that references it",
                             f"use --gc-grace {MIN_GRACE:g} or more (default 600)")
    return grace


@dataclass
class GcStats:
    """What GC did since start (read by /metrics)."""

    runs: int = 0  # passes finished
    blobs_removed: int = 0


class GarbageCollector:
    def __init__(self, db: Database, locks: Locks, blobs: Blobs, manifests: Manifests, swarm: Swarm,
                 downloads: DownloadCounter, uploads: UploadSessions, instances: Instances, *, interval: float = 30.0,
                 grace: float = 600.0, max_wait: float = MAX_WAIT, leader: Callable[[], bool] | None = None) -> None:
        """``leader``: the timer's passes run only while it answers True (one instance runs GC)."""
        self.db = db
        self.locks = locks
        self.blobs = blobs
        self.manifests = manifests
        self.swarm = swarm
        self.downloads = downloads
        self.uploads = uploads
        self.instances = instances
        self.interval = interval
        self.grace = grace
        self.max_wait = timedelta(seconds=max_wait)
        self._busy_since: dict[str, datetime] = {}  # digest -> when GC first found it being downloaded
        self.stats = GcStats()
        self._worker = Periodic("blob-gc", interval, self.run_once, when=leader)
        self._stop = self._worker.stopping

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def run_once(self, now: datetime | None = None) -> list[str]:
        """One pass; returns the digests deleted."""
        self.manifests.collect()  # normally none: deleting or re-pushing a tag drops its docket manifest at once
        self.uploads.expire()  # /v2 upload sessions idle too long (docs/v2.md, "Blobs and uploads")
        self.uploads.sweep(exclusive=False)  # upload files nobody writes any more (an instance killed mid-push)
        self.downloads.forget_dead()  # leases of instances killed mid-download
        now = now or utcnow()
        cutoff = now - timedelta(seconds=self.grace)
        # blobs unreferenced since a push in progress (on any instance: bodies, open sessions) began wait for it
        for pushing in (self.instances.push_since(now), self.uploads.open_since(now)):
            if pushing is not None and pushing < cutoff:
                cutoff = pushing
        with self.db.session() as s:
            candidates = list(s.scalars(select(Blob.digest).where(Blob.unreferenced_at.is_not(None),
                                                                  Blob.unreferenced_at < cutoff)))
        deleted: list[str] = []
        for digest in candidates:
            if self._stop.is_set():
                break
            with self.locks.blob(digest):
                if self._collect(digest, cutoff, now):
                    deleted.append(digest)
        for digest in set(self._busy_since) - set(candidates):
            del self._busy_since[digest]  # referenced again, or gone
        self.stats.runs += 1
        self.stats.blobs_removed += len(deleted)
        return deleted

    def _collect(self, digest: str, cutoff: datetime, now: datetime) -> bool:
        with self.db.session() as s:
            blob = s.get(Blob, digest)
            if blob is None or blob.unreferenced_at is None or blob.unreferenced_at >= cutoff:
                return False
            info_hash = blob.info_hash  # None for config blobs: no torrent, no seeder, no swarm
        busy = "HTTP downloads in flight" if self.downloads.count(digest) else None
        if busy is None and info_hash is not None:
            busy = self.swarm.busy(info_hash)
        if busy is not None:
            first = self._busy_since.setdefault(digest, now)
            if now - first < self.max_wait:
                log.info("gc: %s has %s; later", digest, busy)
                return False
            log.warning("gc: %s still has %s after %.0f s; deleting it anyway (downloads already running keep "
                        "their open file)", digest, busy, (now - first).total_seconds())
        if not self.blobs.drop_locked(digest, info_hash):  # re-referenced meanwhile: kept (and re-seeded)
            return False
        self._busy_since.pop(digest, None)
        log.info("gc: deleted blob %s (info hash %s)", digest, info_hash)
        return True
