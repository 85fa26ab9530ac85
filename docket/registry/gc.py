"""Garbage collection of blobs no tag references any more.

A blob is referenced while any image uses it as its whole tarball, its config or one of its layers, or a V2
manifest row is stored in it or lists it as config or layer (docs/v2.md). Each pass first drops the manifests
docket wrote for ``docket push`` tags that are gone (origin "docket", untagged, listed by no index in their
repository); manifests pushed through /v2 stay until ``DELETE /v2/<name>/manifests/<digest>``, as the spec expects.
A blob is deleted only when all of these hold: it has been unreferenced for longer than the grace period
(``--gc-grace``), no plain-HTTP download of it is in flight, and the tracker reports no incomplete peers for it
(someone still downloading over BitTorrent needs our seeder). Then, under the blob's lock: stop its seeder,
remove it from the whitelist, delete the DB row (committed), then the files. A crash between the row and the
files leaves orphan files, which start-up removes; the reverse order could leave rows pointing at nothing.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import select

from docket.errors import DocketError
from docket.registry.periodic import Periodic
from docket.registry.blobops import drop_blob_locked
from docket.registry.models import Blob, utcnow

if TYPE_CHECKING:
    from docket.registry.services import RegistryServices

log = logging.getLogger(__name__)


class GarbageCollector:
    def __init__(self, services: RegistryServices, *, interval: float = 30.0, grace: float = 600.0) -> None:
        self.services = services
        self.interval = interval
        self.grace = grace
        self._worker = Periodic("blob-gc", interval, self.run_once)
        self._stop = self._worker.stopping

    def start(self) -> None:
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def run_once(self, now: datetime | None = None) -> list[str]:
        """One pass; returns the digests deleted."""
        sv = self.services
        sv.manifests.collect()  # normally none: deleting or re-pushing a tag drops its docket manifest at once
        uploads = getattr(sv, "uploads", None)
        if uploads is not None:
            uploads.expire()  # /v2 upload sessions idle too long (docs/v2.md, "Blobs and uploads")
        cutoff = (now or utcnow()) - timedelta(seconds=self.grace)
        with sv.db.session() as s:
            candidates = list(s.scalars(select(Blob.digest).where(Blob.unreferenced_at.is_not(None),
                                                                  Blob.unreferenced_at <= cutoff)))
        deleted: list[str] = []
        for digest in candidates:
            if self._stop.is_set():
                break
            with sv.blob_locks.hold(digest):
                if self._collect(digest, cutoff):
                    deleted.append(digest)
        return deleted

    def _collect(self, digest: str, cutoff: datetime) -> bool:
        sv = self.services
        if sv.downloads.count(digest):
            log.debug("gc: %s has HTTP downloads in flight; later", digest)
            return False
        with sv.db.session() as s:
            blob = s.get(Blob, digest)
            if blob is None or blob.unreferenced_at is None or blob.unreferenced_at > cutoff:
                return False
            info_hash = blob.info_hash  # None for config blobs: no torrent, no seeder, no swarm
        if info_hash is not None and not self._swarm_idle(digest, info_hash):
            return False
        if not drop_blob_locked(sv, digest, info_hash):  # re-referenced meanwhile: kept (and re-seeded)
            return False
        log.info("gc: deleted blob %s (info hash %s)", digest, info_hash)
        return True

    def _swarm_idle(self, digest: str, info_hash: str) -> bool:
        """True when no BitTorrent peer is still downloading; unknown (tracker down) counts as busy."""
        sv = self.services
        if not sv.config.seeding:
            return True  # no swarm: P2P is disabled in this registry
        try:
            result = sv.tracker.scrape(info_hash)
        except DocketError as exc:
            log.info("gc: cannot scrape tracker for %s (%s); keeping it for now", digest, exc.message)
            return False
        if result.incomplete:
            log.info("gc: %s still has %d downloading peer(s); later", digest, result.incomplete)
            return False
        return True
