"""Everything one registry process owns, in one object kept in ``app.extensions["docket"]``.

``create_app`` builds it and migrates the database (cheap, no processes). The serve command calls ``start()``
(tracker, seeders, GC, start-up clean-up) and ``stop()`` on SIGTERM/SIGINT. Pushing and tag changes live here,
not in the HTTP layer, so the order that makes a tag visible only when its blob is stored, hashed and seeded
is written down once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torf
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from docket.errors import NotFound, ServiceUnavailable
from docket.imagetar import ImageInfo, inspect_image_tar
from docket.registry.config import RegistryConfig
from docket.registry.db import Database
from docket.registry.models import Blob, Image, utcnow
from docket.registry.seeder import SeederSupervisor, SeedSpec, reap_orphans
from docket.registry.store import BlobStore, Upload, digest_hex
from docket.registry.tracker import ExternalTracker, ManagedTracker, Tracker
from docket.torrent import build_torrent, find_ctorrent

log = logging.getLogger(__name__)


class DownloadCounter:
    """In-flight plain-HTTP blob downloads per digest: GC never deletes a blob someone is reading."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, digest: str) -> None:
        with self._lock:
            self._counts[digest] += 1

    def release(self, digest: str) -> None:
        with self._lock:
            self._counts[digest] -= 1
            if self._counts[digest] <= 0:
                del self._counts[digest]

    def count(self, digest: str) -> int:
        with self._lock:
            return self._counts.get(digest, 0)


class KeyedLocks:
    """One lock per key (digest), created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
            with self._guard:
                lock, users = self._locks[key]
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


def image_record(image: Image, blob: Blob) -> dict[str, Any]:
    """The image record of docs/http-api.md."""
    return {
        "repository": image.repository,
        "tag": image.tag,
        "ref": image.ref,
        "image_id": image.image_id,
        "created": rfc3339(image.created),
        "size": image.size,
        "digest": blob.digest,
        "info_hash": blob.info_hash,
        "piece_length": blob.piece_length,
        "pushed_at": rfc3339(image.pushed_at),
        "torrent_url": f"/api/v1/blobs/{blob.digest}/torrent",
        "blob_url": f"/api/v1/blobs/{blob.digest}",
    }


def rfc3339(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


class RegistryServices:
    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.store = BlobStore(config.location)
        self.db = Database(config.database_url)
        self.tracker: Tracker = (
            ExternalTracker(config.tracker)
            if config.tracker
            else ManagedTracker(config.advertise_address, config.tracker_port, self.store.tracker_dir,
                                enabled=config.seeding)
        )
        self.seeders: SeederSupervisor | None = (
            SeederSupervisor(listen_ip=config.seeder_ip,
                             tracker=self.tracker if isinstance(self.tracker, ManagedTracker) else None)
            if config.seeding else None
        )
        self.downloads = DownloadCounter()
        self.blob_locks = KeyedLocks()
        self.tag_lock = threading.Lock()  # serializes tag writes (SQLite has one writer anyway)
        from docket.registry.gc import GarbageCollector

        self.gc = GarbageCollector(self, interval=config.gc_interval, grace=config.gc_grace)
        self.started = False

    @property
    def announce_url(self) -> str:
        return self.tracker.announce_url

    # -- lifecycle ------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Directories and schema; safe to call from create_app (starts no processes)."""
        self.store.ensure_layout()
        self.db.migrate()

    def preflight(self) -> None:
        """Fail early, with the install hint, when a tool the serve command needs is missing."""
        if self.config.seeding:
            find_ctorrent()
            if isinstance(self.tracker, ManagedTracker):
                self.tracker.preflight()

    def start(self) -> None:
        """Start-up clean-up, then tracker (with the full whitelist), then every seeder, then GC."""
        self.preflight()
        self.store.clean_stale_uploads()
        if self.config.seeding:
            reap_orphans(self.store.seeders_dir)
        blobs = self.reconcile()
        self.tracker.start([b.info_hash for b in blobs])
        self.started = True
        if self.seeders is not None:
            for b in blobs:
                if self.store.has_blob(b.digest):
                    self.seeders.ensure(self.seed_spec(b.digest), wait_listening=0)
            self.seeders.start()
        self.gc.start()

    def stop(self) -> None:
        """Stop GC, seeders, tracker (in that order); idempotent."""
        self.gc.stop()
        if self.seeders is not None:
            self.seeders.stop()
        self.tracker.stop()
        self.started = False

    def reconcile(self) -> list[Blob]:
        """Bring files and rows together after a crash: orphan files go, missing torrents are rebuilt,
        torrents get the current announce URL (the info hash does not depend on it)."""
        with self.db.session() as s:
            blobs = list(s.scalars(select(Blob)))
            known = {b.digest for b in blobs}
            for digest in self.store.list_blob_digests():
                if digest not in known:
                    log.warning("removing blob %s: no database row (a push was interrupted)", digest)
                    self.store.delete(digest)
            for torrent in self.store.torrents_dir.glob("*.torrent"):
                if f"sha256:{torrent.stem}" not in known:
                    torrent.unlink(missing_ok=True)
            changed = False
            for b in blobs:
                if not self.store.has_blob(b.digest):
                    log.error("blob %s is missing from %s; its tags cannot be pulled", b.digest, self.store.blobs_dir)
                    continue
                tpath = self.store.torrent_path(b.digest)
                if not tpath.is_file():
                    meta = self._build_torrent(b.digest)
                    if meta.info_hash != b.info_hash:
                        b.info_hash, b.piece_length = meta.info_hash, meta.piece_length
                        changed = True
                else:
                    self._retarget_torrent(tpath)
            if changed:
                s.commit()
            return blobs

    def _retarget_torrent(self, path: Path) -> None:
        try:
            t = torf.Torrent.read(path)
            if [list(tier) for tier in t.trackers] == [[self.announce_url]]:
                return
            t.trackers = [self.announce_url]
            data = t.dump()
        except (torf.TorfError, OSError) as exc:
            log.error("cannot read torrent %s: %s", path, exc)
            return
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        log.info("torrent %s now announces to %s", path.name, self.announce_url)

    def seed_spec(self, digest: str) -> SeedSpec:
        return SeedSpec(digest=digest, torrent=self.store.torrent_path(digest), blob=self.store.blob_path(digest),
                        workdir=self.store.seeder_dir(digest))

    def _build_torrent(self, digest: str):  # -> TorrentMeta
        return build_torrent(self.store.blob_path(digest), self.announce_url, out=self.store.torrent_path(digest),
                             threads=self.config.hash_threads, name=f"{digest_hex(digest)}.tar")

    # -- operations -----------------------------------------------------------------------------------------
    def publish(self, upload: Upload, repository: str, tag: str) -> dict[str, Any]:
        """Upload (finished, fsynced) -> checked tar -> blob in place -> torrent -> blob row -> whitelist ->
        seeder -> tag row. Only the last commit makes the tag visible."""
        digest = upload.digest
        info: ImageInfo = inspect_image_tar(upload.path)
        with self.blob_locks.hold(digest):
            self.store.commit(upload, digest)
            with self.db.session() as s:
                blob = s.get(Blob, digest)
                if blob is None or not self.store.torrent_path(digest).is_file():
                    meta = self._build_torrent(digest)
                    if blob is None:
                        # unreferenced until the tag commits: if this push dies, GC reclaims it after the grace
                        blob = Blob(digest=digest, size=upload.size, info_hash=meta.info_hash,
                                    piece_length=meta.piece_length, created_at=utcnow(), unreferenced_at=utcnow())
                        s.add(blob)
                    else:
                        blob.info_hash, blob.piece_length = meta.info_hash, meta.piece_length
                    with self.tag_lock:
                        s.commit()
                info_hash = blob.info_hash
            self.tracker.add(info_hash)  # whitelisted before the seeder's first announce
            if self.seeders is not None and not self.seeders.ensure(self.seed_spec(digest)):
                error = self.seeders.snapshot().get(digest, {}).get("error")
                self.seeders.remove(digest)  # the blob row stays unreferenced: a retry re-seeds, GC reclaims
                raise ServiceUnavailable(f"could not start a seeder for {digest}: {error or 'ctorrent failed'}",
                                         "see the registry log; the push can be retried")
            with self.tag_lock, self.db.session() as s:
                blob = s.get(Blob, digest)
                assert blob is not None
                blob.unreferenced_at = None
                image = s.scalars(select(Image).where(Image.repository == repository, Image.tag == tag)).one_or_none()
                old_digest = image.blob_digest if image is not None else None
                if image is None:
                    image = Image(repository=repository, tag=tag)
                    s.add(image)
                image.image_id = info.image_id
                image.created = info.created
                image.size = upload.size
                image.blob_digest = digest
                image.pushed_at = utcnow()
                s.flush()
                if old_digest is not None and old_digest != digest:
                    _mark_if_unreferenced(s, old_digest)
                s.commit()
                record = image_record(image, blob)
        log.info("pushed %s:%s -> %s (%d bytes, image %s)", repository, tag, digest, upload.size, info.image_id)
        return record

    def get_image(self, session: Session, repository: str, tag: str) -> dict[str, Any]:
        image = session.scalars(select(Image).where(Image.repository == repository, Image.tag == tag)).one_or_none()
        if image is None:
            raise NotFound(f"no image {repository}:{tag} in this registry", "list images with GET /api/v1/images")
        return image_record(image, image.blob)

    def list_images(self, session: Session) -> list[dict[str, Any]]:
        rows = session.execute(select(Image, Blob).join(Blob, Image.blob_digest == Blob.digest)
                               .order_by(Image.repository, Image.tag)).all()
        return [image_record(i, b) for i, b in rows]

    def delete_tag(self, repository: str, tag: str) -> None:
        with self.tag_lock, self.db.session() as s:
            image = s.scalars(select(Image).where(Image.repository == repository, Image.tag == tag)).one_or_none()
            if image is None:
                raise NotFound(f"no image {repository}:{tag} in this registry")
            digest = image.blob_digest
            s.delete(image)
            s.flush()
            _mark_if_unreferenced(s, digest)
            s.commit()
        log.info("deleted tag %s:%s (blob %s kept until GC)", repository, tag, digest)

    def get_blob(self, session: Session, digest: str) -> Blob:
        blob = session.get(Blob, digest)
        if blob is None or not self.store.has_blob(digest):
            raise NotFound(f"no blob {digest} in this registry")
        return blob


def _mark_if_unreferenced(session: Session, digest: str) -> None:
    refs = session.scalar(select(func.count()).select_from(Image).where(Image.blob_digest == digest))
    if not refs:
        blob = session.get(Blob, digest)
        if blob is not None and blob.unreferenced_at is None:
            blob.unreferenced_at = utcnow()
