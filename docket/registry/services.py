"""Everything one registry process owns, in one object kept in ``app.extensions["docket"]``.

``create_app`` builds it and migrates the database (cheap, no processes). The serve command calls ``start()``
(tracker, seeders, GC, start-up clean-up) and ``stop()`` on SIGTERM/SIGINT. Pushing and tag changes live here,
not in the HTTP layer, so the order that makes a tag visible only when its blob is stored, hashed and seeded
is written down once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torf
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from docket.errors import DocketError, InvalidImage, InvalidRequest, NotFound, ServiceUnavailable
from docket.imagetar import MAX_CONFIG_BYTES, ImageInfo, config_diff_ids, inspect_image_tar, iter_layers, parse_created
from docket.registry.config import RegistryConfig
from docket.registry.db import Database
from docket.registry.models import (
    FORMAT_LAYERS,
    FORMAT_TARBALL,
    KIND_BLOB,
    KIND_CONFIG,
    KIND_LAYER,
    KIND_MANIFEST,
    SEEDED_KINDS,
    Blob,
    Image,
    ImageLayer,
    utcnow,
)
from docket.registry.seeder import SeederSupervisor, SeedSpec, reap_orphans
from docket.registry.store import BlobStore, Upload, digest_hex
from docket.registry.tracker import ExternalTracker, ManagedTracker, Tracker
from docket.torrent import build_torrent, find_ctorrent
from docket.torrent.metainfo import PieceHasher, retarget_torrent

log = logging.getLogger(__name__)


ORPHAN_ADOPT_LIMIT = 16  # blob files without a row that start-up adopts by itself (see _adopt_orphans)


class OrphanBlobs(DocketError):
    """Start-up found blob files the database does not know: a lost, emptied or replaced database."""

    status, code, exit_code = 500, "DATABASE_MISMATCH", 11


def _guess_kind(path: Path, size: int) -> str:
    """The kind of an adopted blob file from its bytes: an image config, a V2 manifest, other JSON, else a layer
    (seeded: a docket push that finds it skips the upload and needs it as a layer)."""
    if size <= MAX_CONFIG_BYTES:
        with open(path, "rb") as f:
            head = f.read(1)
            if head == b"{":
                raw = head + f.read()
                try:
                    config_diff_ids(raw)
                    return KIND_CONFIG
                except InvalidImage:
                    pass
                try:  # pushed bytes: 100,000 nested brackets must not stop the start-up with a RecursionError
                    from docket.jsonstrict import loads as strict_loads

                    doc = strict_loads(raw, what="blob")
                except InvalidRequest:
                    return KIND_LAYER
                return KIND_MANIFEST if isinstance(doc, dict) and "schemaVersion" in doc else KIND_BLOB
    return KIND_LAYER


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


def canonical_manifest(config: str, layers: list[str]) -> bytes:
    """The manifest of docs/layers.md; its sha256 is the image record's ``digest`` (format "layers")."""
    return json.dumps({"config": config, "layers": list(layers)}, separators=(",", ":"), sort_keys=True).encode()


def manifest_digest(config: str, layers: list[str]) -> str:
    return "sha256:" + hashlib.sha256(canonical_manifest(config, layers)).hexdigest()


def blob_answer(blob: Blob) -> dict[str, Any]:
    """The body of ``POST /api/v1/blobs``."""
    return {"digest": blob.digest, "size": blob.size, "kind": blob.kind, "info_hash": blob.info_hash}


def image_record(image: Image) -> dict[str, Any]:
    """The image record of docs/http-api.md (format "tarball"), docs/layers.md (format "layers") or docs/v2.md
    (formats "index" and "artifact": V2 manifests docket cannot pull)."""
    from docket.registry.manifests import DOCKER_LAYER_TAR
    head = {
        "repository": image.repository,
        "tag": image.tag,
        "ref": image.ref,
        "image_id": image.image_id,
        "created": rfc3339(image.created),
        "size": image.size,
    }
    if image.format == FORMAT_TARBALL:
        blob = image.blob
        assert blob is not None
        return {
            **head,
            "digest": blob.digest,
            "info_hash": blob.info_hash,
            "piece_length": blob.piece_length,
            "pushed_at": rfc3339(image.pushed_at),
            "torrent_url": f"/api/v1/blobs/{blob.digest}/torrent",
            "blob_url": f"/api/v1/blobs/{blob.digest}",
            "format": FORMAT_TARBALL,
        }
    manifest = image.manifest
    v2 = {"digest": image.manifest_digest, "manifest_digest": image.manifest_digest,
          "media_type": manifest.media_type if manifest is not None else None}
    if image.format != FORMAT_LAYERS:  # "index", "artifact": pushed through /v2, not pullable by docket
        return {
            **head,
            "pushed_at": rfc3339(image.pushed_at),
            "format": image.format,
            **v2,
            "artifact_type": manifest.artifact_type if manifest is not None else None,
            "manifest_url": f"/v2/{image.repository}/manifests/{image.manifest_digest}",
        }
    config = image.config
    assert config is not None
    return {
        **head,
        "pushed_at": rfc3339(image.pushed_at),
        "format": FORMAT_LAYERS,
        **v2,
        "config": {"digest": config.digest, "size": config.size, "blob_url": f"/api/v1/blobs/{config.digest}"},
        "layers": [
            {"digest": layer.blob.digest, "diff_id": layer.diff_id or layer.blob.digest,
             "media_type": layer.media_type or DOCKER_LAYER_TAR, "size": layer.blob.size,
             "info_hash": layer.blob.info_hash, "piece_length": layer.blob.piece_length,
             # a 0-byte layer (V2 pushes only) has no torrent: fetch it over HTTP (it is empty)
             "torrent_url": f"/api/v1/blobs/{layer.blob.digest}/torrent" if layer.blob.info_hash else None,
             "blob_url": f"/api/v1/blobs/{layer.blob.digest}"}
            for layer in image.layers
        ],
    }


def _image_query() -> Any:
    return select(Image).options(selectinload(Image.blob), selectinload(Image.config), selectinload(Image.manifest),
                                 selectinload(Image.layers).selectinload(ImageLayer.blob))


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
                                enabled=config.seeding, private=bool(config.read_tokens))
        )
        self.seeders: SeederSupervisor | None = (
            SeederSupervisor(listen_ip=config.seeder_ip,
                             tracker=self.tracker)  # external: re-announce when it restarts
            if config.seeding else None
        )
        self.downloads = DownloadCounter()
        self.blob_locks = KeyedLocks()
        from docket.registry.uploads import UploadSessions

        self.uploads = UploadSessions(self.store, timeout=config.upload_session_timeout)  # /v2 upload sessions
        self.tag_lock = threading.Lock()  # serializes tag writes (SQLite has one writer anyway)
        from docket.registry.gc import GarbageCollector

        self.gc = GarbageCollector(self, interval=config.gc_interval, grace=config.gc_grace)
        from docket.registry.scrub import BlobScrubber

        self.scrubber = BlobScrubber(self, interval=config.scrub_interval)
        from docket.registry.manifests import ManifestService

        self.manifests = ManifestService(self)  # the V2 manifests (docs/v2.md)
        self.started = False

    @property
    def announce_url(self) -> str:
        return self.tracker.announce_url

    # -- lifecycle ------------------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Directories and schema; safe to call from create_app (starts no processes)."""
        self.store.ensure_layout()
        self.db.migrate()
        if self.config.read_tokens:  # info hashes nobody can compute from content (README "Access control")
            from docket.registry.auth import torrent_secret

            self._torrent_secret = torrent_secret(self.config.location)

    _torrent_secret: bytes | None = None

    def torrent_source(self, digest: str) -> str | None:
        """The info dict ``source`` of ``digest``'s torrent: a per-blob secret with read tokens, else none."""
        if self._torrent_secret is None:
            return None
        from docket.registry.auth import torrent_source

        return torrent_source(self._torrent_secret, digest)

    def preflight(self) -> None:
        """Fail early, with the install hint, when a tool the serve command needs is missing."""
        if self.config.seeding:
            find_ctorrent()
            if isinstance(self.tracker, ManagedTracker):
                self.tracker.preflight()

    def start(self) -> None:
        """The location's lock, start-up clean-up, then tracker (with the full whitelist), every seeder, GC."""
        self.preflight()
        self.store.lock()  # before anything touches uploads/, seeders/ or blobs/
        self.store.clean_stale_uploads()
        if self.config.seeding:
            reap_orphans(self.store.seeders_dir)
        blobs = [b for b in self.reconcile() if b.seeded and b.info_hash]
        self.manifests.backfill()  # tags pushed before the V2 API get their manifest (docs/v2.md)
        self.tracker.start([b.info_hash for b in blobs])
        self.started = True
        if self.seeders is not None:
            for b in blobs:
                if self.store.has_blob(b.digest):
                    self.seeders.ensure(self.seed_spec(b.digest), wait_listening=0)
            self.seeders.start()
        self.gc.start()
        self.scrubber.start()  # first pass now, in the background; requests are served meanwhile

    def stop(self) -> None:
        """Stop scrubber, GC, seeders, tracker (in that order); idempotent."""
        self.scrubber.stop()
        self.gc.stop()
        if self.seeders is not None:
            self.seeders.stop()
        self.tracker.stop()
        self.started = False
        self.store.unlock()

    def reconcile(self) -> list[Blob]:
        """Bring files and rows together after a crash: blob files without a row are kept (adopted, or start-up is
        refused: ``_adopt_orphans``), missing torrents are rebuilt, torrents get the current announce URL (the info
        hash does not depend on it). Nothing here deletes a blob: the database's view is not trusted that far."""
        with self.db.session() as s:
            blobs = list(s.scalars(select(Blob)))
            known = {b.digest for b in blobs}
            orphans = [d for d in self.store.list_blob_digests() if d not in known and self.store.has_blob(d)]
            if orphans:
                blobs.extend(self._adopt_orphans(s, orphans, len(known)))
                known.update(orphans)
            for torrent in self.store.torrents_dir.glob("*.torrent"):
                algorithm = "sha512" if len(torrent.stem) == 128 else "sha256"
                if f"{algorithm}:{torrent.stem}" not in known:  # derived data: rebuilt from its blob if needed
                    torrent.unlink(missing_ok=True)
            changed = False
            unseeded: set[str] = set()
            for b in blobs:
                if not self.store.has_blob(b.digest):
                    log.error("blob %s is missing from %s; its tags cannot be pulled", b.digest, self.store.blobs_root)
                    continue
                if not b.seeded:
                    continue  # config blobs: plain HTTP only, no torrent
                tpath = self.store.torrent_path(b.digest)
                if not tpath.is_file() or b.info_hash is None:
                    try:
                        meta = self._build_torrent(b.digest)
                    except OSError as exc:  # a full disk, EIO: serve what is there (HTTP), health says the rest
                        log.error("cannot build the torrent of blob %s: %s; it is not seeded", b.digest, exc)
                        unseeded.add(b.digest)
                        continue
                    if meta.info_hash != b.info_hash:
                        b.info_hash, b.piece_length = meta.info_hash, meta.piece_length
                        changed = True
                else:
                    meta = self._retarget_torrent(tpath, b.digest)
                    if meta is not None and meta.info_hash != b.info_hash:  # a secret added or renewed
                        log.info("blob %s: info hash %s -> %s", b.digest, b.info_hash, meta.info_hash)
                        b.info_hash, b.piece_length = meta.info_hash, meta.piece_length
                        changed = True
            if changed:
                s.commit()
            return [b for b in blobs if b.digest not in unseeded]

    def _adopt_orphans(self, s: Session, orphans: list[str], known: int) -> list[Blob]:
        """Blob files the database has no row for. A push interrupted between placing its file and committing its
        row leaves a few (at most one per request thread): they get rows, unreferenced, so GC reclaims them after
        the grace period unless a push uses them. Many, or any beside a database that knows no blob at all, mean
        the database was lost, emptied or replaced: refuse to start (every blob would otherwise be gone), unless
        ``--adopt-orphans`` says to register them all, kept until a tag that uses them is deleted."""
        where = f"{len(orphans)} blob file(s) under {self.store.blobs_root}"
        limit = max(ORPHAN_ADOPT_LIMIT, self.config.threads)
        if not self.config.adopt_orphans and (known == 0 or len(orphans) > limit):
            state = "has no record of any blob, but" if known == 0 else f"knows {known} blob(s), but"
            raise OrphanBlobs(
                f"the database {self.db.where} {state} {where} have no row: refusing to start (nothing was deleted)",
                "restore the database from a backup, or start once with --adopt-orphans to register the blobs "
                "again (they are kept; tags must be pushed again, their unchanged blobs are not re-uploaded)")
        keep = self.config.adopt_orphans
        adopted = []
        now = utcnow()
        for digest in orphans:
            path = self.store.blob_path(digest)
            size = path.stat().st_size
            kind = _guess_kind(path, size)
            blob = Blob(digest=digest, size=size, kind=kind, created_at=now, unreferenced_at=None if keep else now)
            s.add(blob)
            adopted.append(blob)
            log.warning("blob %s (%d bytes) had no database row: registered as a %s blob%s", digest, size, kind,
                        " (kept)" if keep else ", unreferenced (GC reclaims it unless a push uses it)")
        with self.tag_lock:
            s.commit()
        log.warning("adopted %s", where)
        return adopted

    def require_space(self, nbytes: int) -> None:
        """NoSpace (507) unless ``nbytes`` more leave ``--min-free-space`` free on every volume the registry writes."""
        from docket.registry.storage import require_space

        require_space(self.storage_paths(), nbytes, self.config.min_free_space)

    def storage_paths(self) -> list[Path]:
        """Where the registry writes: blobs, uploads, torrents and the SQLite file (may be separate mounts)."""
        paths = [self.store.blobs_root, self.store.uploads_dir, self.store.torrents_dir]
        database = self.db.engine.url.database if self.db.engine.dialect.name == "sqlite" else None
        if database and database != ":memory:":
            paths.append(Path(database).parent)
        return paths

    def _retarget_torrent(self, path: Path, digest: str):  # -> TorrentMeta | None
        """The current announce URL and, with read tokens, the blob's secret source (pieces kept: no re-read)."""
        try:
            meta = retarget_torrent(path, self.announce_url, self.torrent_source(digest))
        except (torf.TorfError, OSError) as exc:
            log.error("cannot read torrent %s: %s", path, exc)
            return None
        if meta is not None:
            log.info("torrent %s now announces to %s", path.name, self.announce_url)
        return meta

    def seed_spec(self, digest: str) -> SeedSpec:
        return SeedSpec(digest=digest, torrent=self.store.torrent_path(digest), blob=self.store.blob_path(digest),
                        workdir=self.store.seeder_dir(digest))

    def _build_torrent(self, digest: str, pieces: PieceHasher | None = None):  # -> TorrentMeta
        """From the piece hashes computed while the upload streamed in when they fit the blob, else from the file."""
        if pieces is not None and pieces.usable(self.store.blob_path(digest).stat().st_size):
            return pieces.write_torrent(self.announce_url, out=self.store.torrent_path(digest),
                                        name=f"{digest_hex(digest)}.tar", source=self.torrent_source(digest))
        return build_torrent(self.store.blob_path(digest), self.announce_url, out=self.store.torrent_path(digest),
                             threads=self.config.hash_threads, name=f"{digest_hex(digest)}.tar",
                             source=self.torrent_source(digest))

    # -- operations -----------------------------------------------------------------------------------------
    def _seed(self, digest: str, info_hash: str) -> None:
        """Whitelist (before the seeder's first announce), then make sure a seeder runs; 503 when it cannot."""
        self.tracker.add(info_hash)
        if self.seeders is not None and not self.seeders.ensure(self.seed_spec(digest)):
            error = self.seeders.snapshot().get(digest, {}).get("error")
            self.seeders.remove(digest)  # the blob row stays unreferenced: a retry re-seeds, GC reclaims
            raise ServiceUnavailable(f"could not start a seeder for {digest}: {error or 'ctorrent failed'}",
                                     "see the registry log; the push can be retried")

    def _settle_external(self, seeds: list[tuple[str, str]]) -> None:
        """External tracker: before the tag is visible, wait (bounded) until the tracker accepts these layers, and
        restart the seeders it does not list: they announced while it still refused them (docket-tracker polls
        every few seconds) and would retry only ~15 s later, while the first pulls found no seeder."""
        if not isinstance(self.tracker, ExternalTracker) or self.seeders is None or not seeds:
            return
        unseeded = set(self.tracker.settle(h for _, h in seeds))
        late = [digest for digest, info_hash in seeds if info_hash in unseeded]
        if late:
            log.info("re-announcing %d seeder(s) the tracker refused before it accepted their hashes", len(late))
            self.seeders.reannounce(late)

    def _ensure_torrent_locked(self, s: Session, blob: Blob, pieces: PieceHasher | None = None) -> bool:
        """Build the torrent of a seeded blob when it has none (caller holds the blob lock); True if changed."""
        if not blob.seeded or (blob.info_hash is not None and self.store.torrent_path(blob.digest).is_file()):
            return False
        meta = self._build_torrent(blob.digest, pieces)
        blob.info_hash, blob.piece_length = meta.info_hash, meta.piece_length
        return True

    def _store_locked(self, upload: Upload, kind: str) -> tuple[dict[str, Any], bool]:
        """Finished upload -> blob file in place -> torrent -> row -> whitelist -> seeder (seeded kinds only).
        Caller holds the blob lock. New rows are unreferenced: if nothing references them, GC reclaims them after
        the grace period. Returns (answer, created)."""
        digest = upload.digest
        if self.scrubber.is_damaged(digest):  # the stored file is bad: the verified upload replaces it
            self.store.blob_path(digest).unlink(missing_ok=True)
        with self.db.session() as s:
            had_row = s.get(Blob, digest) is not None
        self.store.commit(upload, digest)
        try:
            answer, created = self._store_row_locked(upload, digest, kind)
        except BaseException:
            if not had_row and not self._has_row(digest):  # the row did not commit (a full disk, a failing
                self.store.delete(digest)                       # database): no blob file without its row
                log.warning("blob %s: its torrent or row could not be written; its file was removed again", digest)
            raise
        if answer["kind"] in SEEDED_KINDS:
            assert answer["info_hash"] is not None
            self._seed(digest, answer["info_hash"])
        return answer, created

    def _has_row(self, digest: str) -> bool:
        try:
            with self.db.session() as s:
                return s.get(Blob, digest) is not None
        except Exception:  # noqa: BLE001 - the database is failing: the commit we are cleaning up after did too
            return False

    def _store_row_locked(self, upload: Upload, digest: str, kind: str) -> tuple[dict[str, Any], bool]:
        """The row (and torrent) of a blob whose file is in place; returns (answer, created)."""
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
            self._ensure_torrent_locked(s, blob, upload.pieces)
            with self.tag_lock:
                s.commit()
            return blob_answer(blob), created

    def store_blob(self, upload: Upload, kind: str) -> tuple[dict[str, Any], bool]:
        """``POST /api/v1/blobs``: store one finished (fsynced, hashed) upload as a blob of ``kind``."""
        with self.blob_locks.hold(upload.digest):
            answer, created = self._store_locked(upload, kind)
        log.info("blob %s (%s, %d bytes) %s", answer["digest"], answer["kind"], answer["size"],
                 "stored" if created else "already present")
        return answer, created

    def publish(self, upload: Upload, repository: str, tag: str) -> dict[str, Any]:
        """Whole-tarball push, split on the server: checked tar -> each layer copied out (hashed, must equal the
        config's diff_id at its position) -> layer blobs and config blob stored and seeded -> manifest committed.
        Nothing is stored unless every layer matches; the caller deletes the temporary tarball."""
        info: ImageInfo = inspect_image_tar(upload.path)
        self.require_space(upload.size)  # the layers are copied out of the tarball: about its size again
        diff_ids = info.diff_ids
        if len(diff_ids) != len(info.layers):
            raise InvalidImage(f"manifest.json lists {len(info.layers)} layer(s) but the image config's "
                               f"rootfs.diff_ids has {len(diff_ids)}", "the tarball was not written by `docker save`")
        chunk_size = self.config.chunk_size
        with contextlib.ExitStack() as stack:
            parts: list[tuple[Upload, str]] = []
            copied: dict[str, str] = {}  # resolved member -> digest: a repeated (symlinked) layer is copied once
            for position, name, resolved, f, size in iter_layers(upload.path, info):
                if resolved in copied:
                    digest = copied[resolved]
                else:
                    part = stack.enter_context(self.store.upload(pieces=True, expected_size=size))
                    while chunk := f.read(chunk_size):
                        part.write(chunk)
                    if part.size != size:
                        raise InvalidImage(f"layer {name!r} is truncated", "the tarball is corrupted")
                    digest = part.finish()
                    copied[resolved] = digest
                    parts.append((part, KIND_LAYER))
                if digest != diff_ids[position]:
                    raise InvalidImage(f"layer {position + 1} ({name!r}) has digest {digest}, but the image config "
                                       f"says {diff_ids[position]}", "the tarball is corrupted or was modified")
            config = stack.enter_context(self.store.upload())
            config.write(info.config_bytes)
            config.finish()
            parts.append((config, KIND_CONFIG))
            for part, kind in parts:  # two members with the same bytes: the second commit just drops its copy
                with self.blob_locks.hold(part.digest):
                    self._store_locked(part, kind)
        record = self.put_manifest(repository, tag, info.image_id, list(diff_ids))
        log.info("pushed tarball %s:%s split into %d layer(s), image %s", repository, tag, len(diff_ids),
                 info.image_id)
        return record

    def put_manifest(self, repository: str, tag: str, config_digest: str, layers: list[str]) -> dict[str, Any]:
        """Check the blobs (present, config matches the layer list, layers seeded), then commit the tag (replacing
        any previous one) in one transaction. Blob locks are held throughout, so GC cannot take one meanwhile.
        The tag also gets a Docker schema 2 manifest (docs/v2.md) so V2 clients can pull it; its digest is the
        record's ``digest``."""
        from docket.registry.manifests import (
            DOCKER_LAYER_TAR,
            ORIGIN_DOCKET,
            close_tag,
            open_tag,
            save_manifest_row,
        )

        v2 = self.manifests.docket_manifest_for(config_digest, layers)  # None: a blob is missing, reported below
        with contextlib.ExitStack() as stack:
            for digest in sorted({config_digest, *layers, *([v2.digest] if v2 else [])}):
                stack.enter_context(self.blob_locks.hold(digest))
            with self.db.session() as s:
                for digest in [config_digest, *layers]:
                    blob = s.get(Blob, digest)
                    if blob is None or not self.store.has_blob(digest):
                        what = "config" if digest == config_digest else "layer"
                        raise NotFound(f"{what} blob {digest} is not in this registry",
                                       f"upload it first with POST /api/v1/blobs?kind={what}&digest={digest}")
                config_blob = s.get(Blob, config_digest)
                assert config_blob is not None
                config, diff_ids = self._read_config(config_digest, config_blob.size)
                if diff_ids != list(layers):
                    raise InvalidImage(f"the layers {layers} do not match the config's rootfs.diff_ids {diff_ids}",
                                       "list the layers in the order of the image config's rootfs.diff_ids")
                changed = False
                for digest in dict.fromkeys(layers):
                    blob = s.get(Blob, digest)
                    assert blob is not None
                    if blob.kind != KIND_LAYER:
                        raise InvalidRequest(f"blob {digest} was uploaded as kind {blob.kind!r}, not as a layer",
                                             f"upload it with POST /api/v1/blobs?kind=layer&digest={digest}")
                    changed |= self._ensure_torrent_locked(s, blob)
                if changed:
                    with self.tag_lock:
                        s.commit()
                seeds = [(d, s.get(Blob, d).info_hash) for d in dict.fromkeys(layers)]  # type: ignore[union-attr]
                size = config_blob.size + sum(s.get(Blob, d).size for d in layers)  # type: ignore[union-attr]
            for digest, info_hash in seeds:
                assert info_hash is not None
                self._seed(digest, info_hash)
            self._settle_external(seeds)  # type: ignore[arg-type]
            if v2 is None:  # a blob arrived after the first look: rare, so its lock is taken out of order here
                v2 = self.manifests.docket_manifest_for(config_digest, layers)
                assert v2 is not None  # every blob is present (checked above, locked)
                stack.enter_context(self.blob_locks.hold(v2.digest))
            self.manifests.store_docket_manifest_locked(v2)
            mdigest = v2.digest
            with self.tag_lock, self.db.session() as s:
                image, old, old_manifest = open_tag(s, repository, tag)
                image.format = FORMAT_LAYERS
                image.blob_digest = None
                image.config_digest = config_digest
                image.manifest_digest = mdigest
                image.image_id = config_digest
                image.created = parse_created(config.get("created"))
                image.size = size
                image.pushed_at = utcnow()
                image.layers.extend(ImageLayer(position=i, blob_digest=d, media_type=DOCKER_LAYER_TAR)
                                    for i, d in enumerate(layers))
                save_manifest_row(s, repository, v2, ORIGIN_DOCKET)
                for digest in {config_digest, *layers}:
                    blob = s.get(Blob, digest)
                    assert blob is not None
                    blob.unreferenced_at = None
                close_tag(s, image, old, old_manifest)
                s.commit()
                image = s.scalars(_image_query().where(Image.id == image.id)
                                  .execution_options(populate_existing=True)).one()  # relationships as committed
                record = image_record(image)
        log.info("pushed %s:%s -> %s (%d layer(s), %d bytes, image %s)", repository, tag, mdigest, len(layers),
                 size, config_digest)
        return record

    def _read_config(self, digest: str, size: int) -> tuple[dict[str, Any], list[str]]:
        """The config blob as JSON and its ``rootfs.diff_ids`` (InvalidImage when it is not an image config)."""
        if size > MAX_CONFIG_BYTES:
            raise InvalidImage(f"config blob {digest} is {size} bytes; the limit is {MAX_CONFIG_BYTES}")
        raw = self.store.blob_path(digest).read_bytes()
        hint = "the config blob must be the image config (its digest is the image id)"
        try:
            diff_ids = list(config_diff_ids(raw))
        except InvalidImage as exc:
            raise InvalidImage(f"config blob {digest}: {exc.message}", hint) from exc
        return json.loads(raw), diff_ids

    def _find_image(self, session: Session, repository: str, tag: str) -> Image:
        image = session.scalars(_image_query().where(Image.repository == repository, Image.tag == tag)).one_or_none()
        if image is None:
            raise NotFound(f"no image {repository}:{tag} in this registry", "list images with GET /api/v1/images")
        return image

    def get_image(self, session: Session, repository: str, tag: str) -> dict[str, Any]:
        return image_record(self._find_image(session, repository, tag))

    def get_manifest(self, session: Session, repository: str, tag: str) -> tuple[bytes, str]:
        """The canonical manifest of a format "layers" image and its digest."""
        image = self._find_image(session, repository, tag)
        if image.format != FORMAT_LAYERS or image.config_digest is None:
            raise NotFound(f"{repository}:{tag} was pushed as a whole tarball (format tarball): it has no manifest",
                           "GET /api/v1/repositories/<repository>/tags/<tag> describes it")
        layers = [layer.blob_digest for layer in image.layers]
        return canonical_manifest(image.config_digest, layers), manifest_digest(image.config_digest, layers)

    def list_images(self, session: Session) -> list[dict[str, Any]]:
        images = session.scalars(_image_query().order_by(Image.repository, Image.tag)).all()
        return [image_record(i) for i in images]

    def delete_tag(self, repository: str, tag: str) -> None:
        """The tag goes; a manifest docket wrote for it goes too unless another tag or an index uses it (a V2
        manifest stays until DELETE /v2/<name>/manifests/<digest>); blobs nothing uses become unreferenced."""
        from docket.registry.manifests import drop_docket_manifest_if_unused, drop_tag, image_digests

        with self.tag_lock, self.db.session() as s:
            image = s.scalars(_image_query().where(Image.repository == repository, Image.tag == tag)).one_or_none()
            if image is None:
                raise NotFound(f"no image {repository}:{tag} in this registry")
            digests = image_digests(image)
            drop_docket_manifest_if_unused(s, repository, drop_tag(s, image))
            s.commit()
        log.info("deleted tag %s:%s (blobs %s kept until GC)", repository, tag, ", ".join(sorted(digests)))

    def get_blob(self, session: Session, digest: str) -> Blob:
        blob = session.get(Blob, digest)
        if blob is None or not self.store.has_blob(digest):
            if blob is not None:
                self.scrubber.check_servable(digest)  # a row whose file vanished (found by a scrub): 503, not 404
            raise NotFound(f"no blob {digest} in this registry")
        self.scrubber.check_servable(digest)
        return blob

    def get_torrent_blob(self, session: Session, digest: str) -> Blob:
        blob = self.get_blob(session, digest)
        if blob.info_hash is None or not self.store.torrent_path(digest).is_file():
            raise NotFound(f"blob {digest} is a {blob.kind} blob: it has no torrent",
                           "download it over plain HTTP: GET /api/v1/blobs/<digest>")
        return blob
