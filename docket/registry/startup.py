"""Start-up reconciliation of files and rows after a crash (``Reconciler.run``), before anything is seeded.

Blob files without a row are kept (adopted, or start-up is refused: ``_adopt``), missing torrents are rebuilt,
torrents get the current announce URL (the info hash does not depend on it). Nothing here deletes a blob: the
database's view is not trusted that far.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from docket.errors import DocketError, InvalidImage, InvalidRequest
from docket.imagetar import MAX_CONFIG_BYTES, config_diff_ids
from docket.jsonstrict import loads as strict_loads
from docket.registry.db import Database
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
                 adopt_limit: int) -> None:
        """``adopt_orphans``: register every orphan file (``--adopt-orphans``); ``adopt_limit``: how many a
        start-up adopts by itself (a push interrupted per request thread leaves at most one)."""
        self.db = db
        self.store = store
        self.locks = locks
        self.swarm = swarm
        self.adopt_orphans = adopt_orphans
        self.adopt_limit = max(ORPHAN_ADOPT_LIMIT, adopt_limit)

    def run(self) -> list[Blob]:
        """Every blob row whose file is there and whose torrent (seeded kinds) could be built."""
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
        where = f"{len(orphans)} blob file(s) under {self.store.local_path(orphans[0]).parent.parent}"
        if not self.adopt_orphans and (known == 0 or len(orphans) > self.adopt_limit):
            state = "has no record of any blob, but" if known == 0 else f"knows {known} blob(s), but"
            raise OrphanBlobs(
                f"the database {self.db.where} {state} {where} have no row: refusing to start (nothing was deleted)",
                "restore the database from a backup, or start once with --adopt-orphans to register the blobs "
                "again (they are kept; tags must be pushed again, their unchanged blobs are not re-uploaded)")
        keep = self.adopt_orphans
        adopted = []
        now = utcnow()
        for digest in orphans:
            size = self.store.stat(digest) or 0
            kind = guess_kind(self.store, digest, size)
            blob = Blob(digest=digest, size=size, kind=kind, created_at=now, unreferenced_at=None if keep else now)
            s.add(blob)
            adopted.append(blob)
            log.warning("blob %s (%d bytes) had no database row: registered as a %s blob%s", digest, size, kind,
                        " (kept)" if keep else ", unreferenced (GC reclaims it unless a push uses it)")
        with self.locks.tags:
            s.commit()
        log.warning("adopted %s", where)
        return adopted
