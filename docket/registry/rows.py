"""Writes of tag and manifest rows, and the unreferenced marks that follow them (GC's input). Callers hold the
tag lock (``Locks.tags``) and commit."""

from __future__ import annotations

import json
import logging

from sqlalchemy.orm import Session

from docket.registry.models import REF_MANIFEST, Blob, Image, Manifest, ManifestRef, count_references, utcnow
from docket.registry.oci import ParsedManifest
from docket.registry.queries import ORIGIN_DOCKET, ORIGIN_V2, find_image, find_manifest, image_digests, manifest_in_use

log = logging.getLogger(__name__)


def save_manifest_row(s: Session, repository: str, parsed: ParsedManifest, origin: str) -> Manifest:
    """Insert the row (same digest = same bytes = same references: an existing row is kept; a V2 push of bytes
    docket wrote makes them a V2 manifest, kept until deleted). Its blobs are referenced from now on."""
    row = find_manifest(s, repository, parsed.digest)
    if row is None:
        row = Manifest(repository=repository, digest=parsed.digest, media_type=parsed.media_type, size=parsed.size,
                       artifact_type=parsed.artifact_type,
                       subject_digest=parsed.subject.digest if parsed.subject else None,
                       config_digest=parsed.config.digest if parsed.config else None,
                       annotations=json.dumps(parsed.annotations) if parsed.annotations else None, origin=origin,
                       created_at=utcnow())
        row.refs = [ManifestRef(position=i, digest=d, kind=k) for i, (d, k) in enumerate(parsed.refs)]
        s.add(row)
    elif origin == ORIGIN_V2 and row.origin != ORIGIN_V2:
        row.origin = ORIGIN_V2
    for digest in {parsed.digest, *(d.digest for d in parsed.blobs)}:
        blob = s.get(Blob, digest)
        if blob is not None:
            blob.unreferenced_at = None
    s.flush()
    return row


def mark_if_unreferenced(s: Session, digest: str) -> None:
    if not count_references(s, digest):
        blob = s.get(Blob, digest)
        if blob is not None and blob.unreferenced_at is None:
            blob.unreferenced_at = utcnow()


def drop_manifest_row(s: Session, row: Manifest) -> None:
    """Delete the row; its bytes and the blobs only it referenced become unreferenced (GC after the grace)."""
    digests = {row.digest, *(r.digest for r in row.refs if r.kind != REF_MANIFEST)}
    s.delete(row)
    s.flush()
    for digest in sorted(digests):
        mark_if_unreferenced(s, digest)


def drop_docket_manifest_if_unused(s: Session, repository: str, digest: str | None) -> bool:
    """A manifest docket wrote for a push lives as long as a tag (or an index) uses it."""
    if not digest:
        return False
    row = find_manifest(s, repository, digest)
    if row is None or row.origin != ORIGIN_DOCKET or manifest_in_use(s, repository, digest):
        return False
    drop_manifest_row(s, row)
    log.info("dropped manifest %s of %s: docket wrote it for a tag that is gone", digest, repository)
    return True


def drop_untagged_manifests(s: Session, repository: str, digest: str | None) -> list[str]:
    """Retention: the manifest ``digest`` (either origin) goes when no tag and no index of ``repository`` uses it
    any more, then the children of an index that only it kept. Returns the digests dropped."""
    if not digest:
        return []
    row = find_manifest(s, repository, digest)
    if row is None or manifest_in_use(s, repository, digest):
        return []
    children = [r.digest for r in row.refs if r.kind == REF_MANIFEST]
    drop_manifest_row(s, row)
    log.info("dropped manifest %s of %s: its last tag is gone", digest, repository)
    dropped = [digest]
    for child in dict.fromkeys(children):
        dropped += drop_untagged_manifests(s, repository, child)
    return dropped


def open_tag(s: Session, repository: str, tag: str) -> tuple[Image, set[str], str | None]:
    """The tag's row (new, or emptied of its layers) to fill in, with the blobs and manifest it used before."""
    image = find_image(s, repository, tag)
    if image is None:
        image = Image(repository=repository, tag=tag)
        s.add(image)
        return image, set(), None
    old, old_manifest = image_digests(image), image.manifest_digest
    image.layers.clear()
    s.flush()  # old positions go before new ones with the same keys arrive
    return image, old, old_manifest


def drop_tag(s: Session, image: Image) -> str | None:
    """Delete a tag's row; the blobs only it used become unreferenced. Returns the manifest it pointed at."""
    used, manifest = image_digests(image), image.manifest_digest
    s.delete(image)
    s.flush()
    for digest in sorted(used):
        mark_if_unreferenced(s, digest)
    return manifest


def close_tag(s: Session, image: Image, old: set[str], old_manifest: str | None) -> None:
    """After a tag moved: what it used before and nothing uses now becomes unreferenced (GC after the grace)."""
    s.flush()
    for digest in sorted(old - image_digests(image)):
        mark_if_unreferenced(s, digest)
    if old_manifest != image.manifest_digest:
        drop_docket_manifest_if_unused(s, image.repository, old_manifest)
