"""The read side of the registry database: image rows with what they use, manifest rows, listings.

Functions of a Session (the caller's: a request's, or a component's transaction); nothing here writes.
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session, selectinload

from docket.errors import NameUnknown
from docket.registry.models import REF_MANIFEST, Blob, BlobDamage, Image, ImageLayer, Manifest, ManifestRef

ORIGIN_V2, ORIGIN_DOCKET = "v2", "docket"  # who wrote a manifest row: a /v2 push, or the registry for a docket push


def image_query() -> Select:
    return select(Image).options(selectinload(Image.blob), selectinload(Image.config), selectinload(Image.manifest),
                                 selectinload(Image.layers).selectinload(ImageLayer.blob))


def find_image(s: Session, repository: str, tag: str) -> Image | None:
    return s.scalars(image_query().where(Image.repository == repository, Image.tag == tag)).one_or_none()


def image_by_id(s: Session, image_id: int) -> Image:
    """As committed (relationships reloaded)."""
    return s.scalars(image_query().where(Image.id == image_id).execution_options(populate_existing=True)).one()


def list_images(s: Session) -> list[Image]:
    """By repository and tag in code-point order, sorted here: a PostgreSQL database's collation (e.g. en-US) would
    order "a" before "Z", SQLite the other way."""
    return sorted(s.scalars(image_query()), key=lambda image: (image.repository, image.tag))


def image_digests(image: Image) -> set[str]:
    """Every blob an image row uses (tarball, config, layers)."""
    used = {layer.blob_digest for layer in image.layers}
    used.update(d for d in (image.blob_digest, image.config_digest) if d)
    return used


def whitelist(s: Session) -> list[str]:
    """Every stored blob's info hash but the damaged ones' (scrub.py): what an external opentracker's whitelist
    must contain. From the database, so that every registry instance sharing it answers the same list."""
    return sorted(s.scalars(select(Blob.info_hash).where(
        Blob.info_hash.is_not(None), Blob.digest.not_in(select(BlobDamage.digest)))))


def find_manifest(s: Session, repository: str, digest: str) -> Manifest | None:
    return s.scalars(select(Manifest).where(Manifest.repository == repository, Manifest.digest == digest)).one_or_none()


def parent_indexes(s: Session, repository: str, digest: str) -> list[str]:
    """Digests of the indexes in ``repository`` that list manifest ``digest``."""
    return list(s.scalars(select(Manifest.digest).join(ManifestRef, ManifestRef.manifest_id == Manifest.id)
                          .where(Manifest.repository == repository, ManifestRef.kind == REF_MANIFEST,
                                 ManifestRef.digest == digest)))


def manifest_in_use(s: Session, repository: str, digest: str) -> bool:
    """Tagged in ``repository``, or listed by one of its indexes."""
    tagged = s.scalars(select(Image.id).where(Image.repository == repository, Image.manifest_digest == digest)
                       .limit(1)).first()
    return tagged is not None or bool(parent_indexes(s, repository, digest))


def unused_docket_manifests(s: Session) -> list[Manifest]:
    rows = s.scalars(select(Manifest).where(Manifest.origin == ORIGIN_DOCKET)).all()
    return [row for row in rows if not manifest_in_use(s, row.repository, row.digest)]


def tags(s: Session, repository: str) -> list[str]:
    found = sorted(s.scalars(select(Image.tag).where(Image.repository == repository)))
    if not found and s.scalars(select(Manifest.id).where(Manifest.repository == repository).limit(1)).first() \
            is None:
        raise NameUnknown(f"no repository {repository} in this registry", detail={"name": repository})
    return found


def repositories(s: Session) -> list[str]:
    return sorted(set(s.scalars(select(Image.repository).distinct()))
                  | set(s.scalars(select(Manifest.repository).distinct())))


def referrers(s: Session, repository: str, digest: str, artifact_type: str | None) -> list[dict[str, Any]]:
    """Descriptors of the manifests of ``repository`` whose subject is ``digest``."""
    query = select(Manifest).where(Manifest.repository == repository, Manifest.subject_digest == digest)
    if artifact_type is not None:
        query = query.where(Manifest.artifact_type == artifact_type)
    out = []
    for row in s.scalars(query.order_by(Manifest.id)):
        desc: dict[str, Any] = {"mediaType": row.media_type, "digest": row.digest, "size": row.size}
        if row.artifact_type:
            desc["artifactType"] = row.artifact_type
        if row.annotations:
            desc["annotations"] = json.loads(row.annotations)
        out.append(desc)
    return out
