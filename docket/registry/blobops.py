"""Single-blob operations shared by the V2 API and GC: removing one blob safely, keeping one for a mount.

Callers hold the blob's lock (``services.blob_locks.hold(digest)``), which every writer of references to a blob
also takes, so no tag or manifest starts using it meanwhile.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from docket.registry.models import Blob, count_references, utcnow

if TYPE_CHECKING:
    from docket.registry.services import RegistryServices

log = logging.getLogger(__name__)


def drop_blob_locked(sv: RegistryServices, digest: str, info_hash: str | None, *,
                     require_unreferenced_mark: bool = True) -> bool:
    """Remove one blob, in GC's safe order: stop its seeder and drop it from the tracker's whitelist, then (under
    the tag lock, re-checking that nothing references it) delete the row and commit, then the files. A crash
    between row and files leaves orphan files that start-up adopts as unreferenced (GC takes them again); the
    reverse order could leave rows pointing at nothing. Returns False, re-seeding it, when it turned out to be
    referenced (or, with ``require_unreferenced_mark``, as GC wants, when it is no longer marked unreferenced)."""
    if info_hash is not None:
        if sv.seeders is not None:
            sv.seeders.remove(digest)
        sv.tracker.discard(info_hash)
    with sv.tag_lock, sv.db.session() as s:
        blob = s.get(Blob, digest)
        refs = count_references(s, digest)
        if blob is None or refs or (require_unreferenced_mark and blob.unreferenced_at is None):
            if blob is not None and info_hash is not None:
                _reseed(sv, digest, info_hash)
            return False
        s.delete(blob)
        s.commit()
    sv.store.delete(digest)
    return True


def _reseed(sv: RegistryServices, digest: str, info_hash: str) -> None:
    sv.tracker.add(info_hash)
    if sv.seeders is not None:
        sv.seeders.ensure(sv.seed_spec(digest), wait_listening=0)


def keep_blob_locked(sv: RegistryServices, digest: str) -> bool:
    """A cross-repository mount: True when ``digest`` is stored and servable; an unreferenced blob gets a fresh
    GC grace period (the manifest that will use it comes next), as an upload of the same bytes would."""
    if sv.scrubber.is_damaged(digest) or not sv.store.has_blob(digest):
        return False
    with sv.db.session() as s:
        blob = s.get(Blob, digest)
        if blob is None:
            return False
        if blob.unreferenced_at is not None:
            blob.unreferenced_at = utcnow()
            with sv.tag_lock:
                s.commit()
    return True


def keep_for_existence_check(sv: RegistryServices, digest: str) -> None:
    """A HEAD of a blob: the client will skip uploading it and reference it in its next manifest, so an
    unreferenced blob gets a fresh grace period now (else GC could take it between the HEAD and that manifest)."""
    with sv.blob_locks.hold(digest):
        keep_blob_locked(sv, digest)
