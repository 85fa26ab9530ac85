"""Blobs: storing a finished upload (file, torrent, row, seeder), keeping or dropping one under its lock, and the
checks before one is served. Every writer of references to a blob holds its lock (``Locks.blob``), so GC never
deletes a blob a push is about to reference.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from docket.errors import BlobUnknown, DeleteRefused, NotFound
from docket.registry.db import Database
from docket.registry.instances import Instances
from docket.registry.locks import Locks
from docket.registry.models import KIND_LAYER, Blob, BlobLease, count_references, utcnow
from docket.registry.scrub import BlobScrubber
from docket.registry.storage import require_space
from docket.registry.store import BlobStore, Upload
from docket.registry.swarm import Swarm

log = logging.getLogger(__name__)


class DownloadCounter:
    """In-flight plain-HTTP blob downloads per digest: GC, on whichever instance runs it, never deletes a blob
    someone is reading. Counted here; while this instance has at least one download of a digest, a lease row
    (``blob_leases``) says so to the others. Rows of a dead instance stop counting (``Instances.live_ids``)."""

    def __init__(self, db: Database, instances: Instances) -> None:
        self.db = db
        self.instances = instances
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, digest: str) -> None:
        with self._lock:
            self._counts[digest] += 1
            if self._counts[digest] == 1:
                self._lease(digest, True)

    def release(self, digest: str) -> None:
        with self._lock:
            self._counts[digest] -= 1
            if self._counts[digest] <= 0:
                del self._counts[digest]
                self._lease(digest, False)

    def _lease(self, digest: str, held: bool) -> None:
        """Write or remove our lease row (caller holds the lock: transitions stay in order). A failing database
        costs the lease, not the download: the file a download has open stays readable after a delete."""
        try:
            with self.db.session() as s:
                if held:
                    if s.get(BlobLease, (self.instances.id, digest)) is None:
                        s.add(BlobLease(instance=self.instances.id, digest=digest, since=utcnow()))
                else:
                    s.execute(delete(BlobLease).where(BlobLease.instance == self.instances.id,
                                                      BlobLease.digest == digest))
                s.commit()
        except SQLAlchemyError as exc:
            log.warning("download lease of %s not %s: %s", digest, "written" if held else "removed",
                        str(exc).splitlines()[0])

    def count(self, digest: str) -> int:
        """Downloads of ``digest`` in flight here, plus one for each other live instance with a lease on it."""
        with self._lock:
            local = self._counts.get(digest, 0)
        with self.db.session() as s:
            others = set(s.scalars(select(BlobLease.instance).where(BlobLease.digest == digest,
                                                                      BlobLease.instance != self.instances.id)))
        return local + len(others & self.instances.live_ids()) if others else local

    def forget_dead(self) -> int:
        """Remove the leases of instances that are not alive (GC's pass); returns how many."""
        live = self.instances.live_ids()
        with self.db.session() as s:
            gone = s.execute(delete(BlobLease).where(BlobLease.instance.not_in(live))).rowcount
            s.commit()
        return gone or 0


class Blobs:
    def __init__(self, db: Database, store: BlobStore, swarm: Swarm, locks: Locks, scrubber: BlobScrubber, *,
                 space_paths: list[Path], min_free_space: int) -> None:
        """``space_paths``: the volumes the registry writes (blobs, uploads, torrents, the SQLite file), which
        must keep ``min_free_space`` free."""
        self.db = db
        self.store = store
        self.swarm = swarm
        self.locks = locks
        self.scrubber = scrubber
        self.space_paths = space_paths
        self.min_free_space = min_free_space

    def require_space(self, nbytes: int) -> None:
        """NoSpace (507) unless ``nbytes`` more leave ``--min-free-space`` free on every volume the registry writes."""
        require_space(self.space_paths, nbytes, self.min_free_space)

    # -- storing --------------------------------------------------------------------------------------------
    def store_upload(self, upload: Upload, kind: str) -> tuple[Blob, bool]:
        """Store one finished (fsynced, hashed) upload as a blob of ``kind``; returns (its row, created)."""
        with self.locks.blob(upload.digest):
            blob, created = self.store_locked(upload, kind)
        log.info("blob %s (%s, %d bytes) %s", blob.digest, blob.kind, blob.size,
                 "stored" if created else "already present")
        return blob, created

    def store_locked(self, upload: Upload, kind: str, *, seed: bool = True) -> tuple[Blob, bool]:
        """Finished upload -> blob file in place -> torrent -> row -> whitelist -> seeder (seeded kinds only).
        Caller holds the blob lock. New rows are unreferenced: if nothing references them, GC reclaims them after
        the grace period."""
        digest = upload.digest
        if self.scrubber.is_damaged(digest):  # the stored file is bad: the verified upload replaces it
            self.store.delete(digest)
        had_row = self._has_row(digest)
        self.store.commit(upload, digest)
        try:
            blob, created = self._store_row_locked(upload, digest, kind)
        except BaseException:
            if not had_row and not self._has_row(digest):  # the row did not commit (a full disk, a failing
                self.store.delete(digest)                   # database): no blob file without its row
                log.warning("blob %s: its torrent or row could not be written; its file was removed again", digest)
            raise
        if seed and blob.seeded:
            assert blob.info_hash is not None
            self.swarm.seed(digest, blob.info_hash)
        return blob, created

    def _has_row(self, digest: str) -> bool:
        try:
            with self.db.session() as s:
                return s.get(Blob, digest) is not None
        except Exception:  # noqa: BLE001 - the database is failing: the commit we are cleaning up after did too
            return False

    def _store_row_locked(self, upload: Upload, digest: str, kind: str) -> tuple[Blob, bool]:
        self.scrubber.clear(digest)
        with self.db.session() as s:
            blob = s.get(Blob, digest)
            created = blob is None
            now = utcnow()
            if blob is None:
                blob = Blob(digest=digest, size=upload.size, kind=kind, created_at=now, unreferenced_at=now)
                s.add(blob)
            else:
                if kind == KIND_LAYER and blob.kind != KIND_LAYER:
                    blob.kind = KIND_LAYER  # the same bytes are now also used as a layer: seed them
                if blob.unreferenced_at is not None:
                    blob.unreferenced_at = now  # uploaded again for a coming manifest: a fresh grace period
            self.swarm.ensure_torrent(blob, upload.pieces)
            with self.locks.tags:
                s.commit()
            return blob, created

    # -- keeping and dropping (caller holds the blob lock) --------------------------------------------------
    def drop_locked(self, digest: str, info_hash: str | None, *, require_unreferenced_mark: bool = True) -> bool:
        """Remove one blob, in GC's safe order: stop its seeder and drop it from the whitelist, then (under the
        tag lock, re-checking that nothing references it) delete the row and commit, then the files. A crash
        between row and files leaves orphan files that start-up adopts as unreferenced (GC takes them again); the
        reverse order could leave rows pointing at nothing. Returns False, re-seeding it, when it turned out to
        be referenced (or, with ``require_unreferenced_mark``, as GC wants, when it is no longer marked)."""
        if info_hash is not None:
            self.swarm.unseed(digest, info_hash)
        with self.locks.tags, self.db.session() as s:
            blob = s.get(Blob, digest)
            if blob is None or count_references(s, digest) \
                    or (require_unreferenced_mark and blob.unreferenced_at is None):
                if blob is not None and info_hash is not None:
                    self.swarm.reseed(digest, info_hash)
                return False
            s.delete(blob)
            s.commit()
        self.store.delete(digest)
        self.swarm.forget(digest)
        return True

    def keep(self, digest: str) -> bool:
        """A cross-repository mount, or a HEAD by a client that will skip the upload: True when ``digest`` is
        stored and servable; an unreferenced blob gets a fresh GC grace period (the manifest that will use it comes
        next), as an upload of the same bytes would."""
        with self.locks.blob(digest):
            if self.scrubber.is_damaged(digest) or self.store.stat(digest) is None:
                return False
            with self.db.session() as s:
                blob = s.get(Blob, digest)
                if blob is None:
                    return False
                if blob.unreferenced_at is not None:
                    blob.unreferenced_at = utcnow()
                    with self.locks.tags:
                        s.commit()
            return True

    def delete(self, digest: str) -> None:
        """DELETE of a blob: refused (DeleteRefused) while a tag or manifest references it: blobs are shared by
        every repository, so deleting one a manifest lists would break that manifest."""
        with self.locks.blob(digest):
            with self.db.session() as s:
                blob = s.get(Blob, digest)
                if blob is None:
                    raise BlobUnknown(f"no blob {digest} in this registry", detail={"digest": digest})
                refs = count_references(s, digest)
                info_hash = blob.info_hash
            if refs or not self.drop_locked(digest, info_hash, require_unreferenced_mark=False):
                raise DeleteRefused(f"blob {digest} is in use: {refs or 'a'} tag(s) or manifest(s) reference it",
                                    "delete the manifests that use it; GC then removes the blob after --gc-grace",
                                    detail={"digest": digest, "references": refs})
        self.scrubber.clear(digest)

    # -- serving --------------------------------------------------------------------------------------------
    def servable(self, session: Session, digest: str, *, head: bool = False) -> Blob:
        """The row of a blob that may be served: NotFound, or BlobCorrupt (503) when the scrubber found it bad.
        ``head``: a client checking whether to upload it: a corrupt blob is NotFound, so it is uploaded again
        (which repairs it)."""
        if head and self.scrubber.is_damaged(digest):
            raise NotFound(f"blob {digest} is corrupt on the registry", "upload it again to repair it")
        blob = session.get(Blob, digest)
        if blob is None or self.store.stat(digest) is None:
            if blob is not None:
                self.scrubber.check_servable(digest)  # a row whose file vanished (found by a scrub): 503, not 404
            raise NotFound(f"no blob {digest} in this registry")
        self.scrubber.check_servable(digest)
        return blob
