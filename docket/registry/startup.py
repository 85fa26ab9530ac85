"""Start-up reconciliation of files and rows after a crash (``Reconciler.run``), before anything is seeded.

Blob files without a row are kept (adopted, or start-up is refused: ``_adopt``), missing torrents are rebuilt,
torrents get the current announce URL (the info hash does not depend on it). Nothing here deletes a blob: the
database's view is not trusted that far.

Beside other registry instances (a shared PostgreSQL database, docs/instances.md) the whole pass runs under the
``startup`` lock (two instances starting at once reconcile one after the other), and the others keep working
meanwhile: a push places its blob file a moment before its row is written, and GC removes the row a moment before
the file, both under the blob's lock. So a file or torrent without a row is an orphan only if it still has none
under that lock (``_shared``), each torrent that needs rebuilding is rebuilt under its blob's lock on a fresh row,
and an instance whose tracker is not the one the torrents announce to refuses to start while others run, instead
of pointing every torrent at its own.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from docket.errors import DocketError, InvalidImage, InvalidRequest
from docket.imagetar import MAX_CONFIG_BYTES, config_diff_ids
from docket.jsonstrict import loads as strict_loads
from docket.registry.db import Database
from docket.registry.instances import Instances
from docket.registry.locks import Locks
from docket.registry.models import KIND_BLOB, KIND_CONFIG, KIND_LAYER, KIND_MANIFEST, Blob, utcnow
from docket.registry.store import BlobStore
from docket.registry.swarm import Swarm

log = logging.getLogger(__name__)

ORPHAN_ADOPT_LIMIT = 16  # blob files without a row that start-up adopts by itself (see Reconciler._adopt)


class OrphanBlobs(DocketError):
    """Start-up found blob files the database does not know: a lost, emptied or replaced database."""

    status, code, exit_code = 500, "DATABASE_MISMATCH", 11


def guess_kind(store: BlobStore, digest: str, size: int) -> str:
    """The kind of an adopted blob file from its bytes: an image config, a V2 manifest, other JSON, else a layer
    (seeded: a docket push that finds it skips the upload and needs it as a layer)."""
    if size > MAX_CONFIG_BYTES:
        return KIND_LAYER
    with store.open(digest) as f:
        raw = f.read()
    if raw[:1] != b"{":
        return KIND_LAYER
    try:
        config_diff_ids(raw)
        return KIND_CONFIG
    except InvalidImage:
        pass
    try:  # pushed bytes: 100,000 nested brackets must not stop the start-up with a RecursionError
        doc = strict_loads(raw, what="blob")
    except InvalidRequest:
        return KIND_LAYER
    return KIND_MANIFEST if isinstance(doc, dict) and "schemaVersion" in doc else KIND_BLOB


class Reconciler:
    def __init__(self, db: Database, store: BlobStore, locks: Locks, swarm: Swarm, *, adopt_orphans: bool,
                 adopt_limit: int, instances: Instances | None = None) -> None:
        """``adopt_orphans``: register every orphan file (``--adopt-orphans``); ``adopt_limit``: how many a
        start-up adopts by itself (a push interrupted per request thread leaves at most one); ``instances``: the
        other instances sharing the database (for the tracker check)."""
        self.db = db
        self.store = store
        self.locks = locks
        self.swarm = swarm
        self.adopt_orphans = adopt_orphans
        self.adopt_limit = max(ORPHAN_ADOPT_LIMIT, adopt_limit)
        self.instances = instances

    def run(self) -> list[Blob]:
        """Every blob row whose file is there and whose torrent (seeded kinds) could be built."""
        with self.locks.startup:
            return self._shared() if self.locks.shared else self._alone()

    def _alone(self) -> list[Blob]:
        """One process owns the location (SQLite): one session, nothing moves meanwhile."""
        with self.db.session() as s:
            blobs = list(s.scalars(select(Blob)))
            known = {b.digest for b in blobs}
            orphans = [d for d in self.store.digests() if d not in known and self.store.stat(d) is not None]
            if orphans:
                blobs.extend(self._adopt(s, orphans, len(known)))
                known.update(orphans)
            self.swarm.prune_torrents(known)
            changed = False
            unseeded: set[str] = set()
            for b in blobs:
                if self.store.stat(b.digest) is None:
                    log.error("blob %s is missing from the store; its tags cannot be pulled", b.digest)
                    continue
                if not b.seeded:
                    continue  # config blobs: plain HTTP only, no torrent
                try:
                    changed |= self.swarm.refresh_torrent(b)
                except OSError as exc:  # a full disk, EIO: serve what is there (HTTP), health says the rest
                    log.error("cannot build the torrent of blob %s: %s; it is not seeded", b.digest, exc)
                    unseeded.add(b.digest)
            if changed:
                s.commit()
            return [b for b in blobs if b.digest not in unseeded]

    def _adopt(self, s: Session, orphans: list[str], known: int) -> list[Blob]:
        """Blob files the database has no row for. A push interrupted between placing its file and committing its
        row leaves a few (at most one per request thread): they get rows, unreferenced, so GC reclaims them after
        the grace period unless a push uses them. Many, or any beside a database that knows no blob at all, mean
        the database was lost, emptied or replaced: refuse to start (every blob would otherwise be gone), unless
        ``--adopt-orphans`` says to register them all, kept until a tag that uses them is deleted."""
        where = self._check_orphans(orphans, known)
        adopted = [self._orphan_row(digest) for digest in orphans]
        s.add_all(adopted)
        with self.locks.tags:
            s.commit()
        log.warning("adopted %s", where)
        return adopted

    def _check_orphans(self, orphans: list[str], known: int) -> str:
        """Raise OrphanBlobs unless these orphans may be adopted (see ``_adopt``); returns where they are."""
        where = f"{len(orphans)} blob file(s) under {self.store.local_path(orphans[0]).parent.parent}"
        if not self.adopt_orphans and (known == 0 or len(orphans) > self.adopt_limit):
            state = "has no record of any blob, but" if known == 0 else f"knows {known} blob(s), but"
            raise OrphanBlobs(
                f"the database {self.db.where} {state} {where} have no row: refusing to start (nothing was deleted)",
                "restore the database from a backup, or start once with --adopt-orphans to register the blobs "
                "again (they are kept; tags must be pushed again, their unchanged blobs are not re-uploaded)")
        return where

    def _orphan_row(self, digest: str) -> Blob:
        keep, now = self.adopt_orphans, utcnow()
        size = self.store.stat(digest) or 0
        kind = guess_kind(self.store, digest, size)
        log.warning("blob %s (%d bytes) had no database row: registered as a %s blob%s", digest, size, kind,
                    " (kept)" if keep else ", unreferenced (GC reclaims it unless a push uses it)")
        return Blob(digest=digest, size=size, kind=kind, created_at=now, unreferenced_at=None if keep else now)

    # -- beside other instances (docs/instances.md) ---------------------------------------------------------
    def _shared(self) -> list[Blob]:
        """As ``_alone``, while other instances push and collect: every change under the blob's lock, each in a
        short transaction of its own."""
        with self.db.session() as s:
            blobs = list(s.scalars(select(Blob)))
        known = {b.digest for b in blobs}
        rowless = [d for d in self.store.digests() if d not in known and self.store.stat(d) is not None]
        orphans = [d for d in rowless if self._still_orphan(d)]  # not a push committing it right now
        if orphans:
            where = self._check_orphans(orphans, len(known))
            adopted = [blob for blob in map(self._adopt_locked, orphans) if blob is not None]
            blobs.extend(adopted)
            known.update(b.digest for b in adopted)
            log.warning("adopted %s", where)
        for digest in self.swarm.unknown_torrents(known):
            with self.locks.blob(digest), self.db.session() as s:
                if s.get(Blob, digest) is None:  # not a push's torrent (written before its row)
                    self.swarm.torrent_path(digest).unlink(missing_ok=True)
        self._check_tracker(blobs)
        result = []
        for b in blobs:
            if self.store.stat(b.digest) is None:
                log.error("blob %s is missing from the store; its tags cannot be pulled", b.digest)
            elif b.seeded and not self.swarm.torrent_current(b):
                try:
                    refreshed = self._refresh_locked(b.digest)
                except OSError as exc:
                    log.error("cannot build the torrent of blob %s: %s; it is not seeded", b.digest, exc)
                    continue
                if refreshed is None:
                    continue  # deleted meanwhile (GC on the leader)
                b = refreshed
            result.append(b)
        return result

    def _still_orphan(self, digest: str) -> bool:
        """Under the blob's lock: still a file, still no row (a push holds the lock from its file to its row)."""
        with self.locks.blob(digest), self.db.session() as s:
            return s.get(Blob, digest) is None and self.store.stat(digest) is not None

    def _adopt_locked(self, digest: str) -> Blob | None:
        with self.locks.blob(digest), self.db.session() as s:
            if s.get(Blob, digest) is not None or self.store.stat(digest) is None:
                return None  # pushed or collected since we looked
            blob = self._orphan_row(digest)
            s.add(blob)
            with self.locks.tags:
                s.commit()
            return blob

    def _refresh_locked(self, digest: str) -> Blob | None:
        """The blob's torrent rebuilt or re-targeted under its lock, on the row as it is now; None when gone."""
        with self.locks.blob(digest), self.db.session() as s:
            blob = s.get(Blob, digest)
            if blob is None:
                return None
            if blob.seeded and self.swarm.refresh_torrent(blob):
                s.commit()
            return blob

    def _check_tracker(self, blobs: list[Blob]) -> None:
        """Refuse to re-target the torrents other running instances announce with (a different --tracker)."""
        if self.instances is None:
            return
        ours = self.swarm.announce_url
        theirs = next((url for b in blobs if b.seeded and b.info_hash
                       for url in [self.swarm.torrent_announce(b.digest)] if url is not None), None)
        if theirs is None or theirs == ours:
            return
        others = self.instances.others_running()
        if others:
            raise DocketError(
                f"the torrents announce to {theirs}, the tracker of the {len(others)} other instance(s) running on "
                f"this database; this instance would re-target them all to {ours}",
                f"start every instance with the same --tracker (here: --tracker {theirs.split('//')[-1].split('/')[0]})"
                "; to move to another tracker, stop them all and start them with the new one")
