"""V2 / OCI manifests on the docket store (docs/v2.md, "Manifests, tags, catalog, referrers").

A manifest's bytes are a blob of kind "manifest", stored verbatim; a ``Manifest`` row per repository describes it,
with ``ManifestRef`` rows for its config, layers and (indexes) child manifests. Tags stay rows of ``images``: a tag
pushed through /v2 becomes format "layers" when docket can pull it (an image manifest whose image config lists one
diff_id per layer: the layers get torrents and seeders), else "index" or "artifact". A ``docket push`` gets a
Docker schema 2 manifest written by the registry (origin "docket"), so ``docker pull`` and skopeo can fetch it.

Locking follows services.py: blob locks (sorted, taken once) around everything that makes a blob referenced, the
tag lock around every transaction that changes tags or manifest rows (GC takes both).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from docket import jsonstrict
from docket.errors import InvalidJSON
from docket.imagetar import MAX_CONFIG_BYTES, parse_created
from docket.limits import MAX_LAYERS
from docket.reference import ANY_DIGEST_RE, TAG_RE
from docket.registry.models import (
    FORMAT_ARTIFACT,
    FORMAT_INDEX,
    FORMAT_LAYERS,
    FORMAT_TARBALL,
    KIND_LAYER,
    KIND_MANIFEST,
    KIND_TARBALL,
    REF_CONFIG,
    REF_LAYER,
    REF_MANIFEST,
    Blob,
    Image,
    ImageLayer,
    Manifest,
    ManifestRef,
    count_references,
    utcnow,
)
from docket.registry.v2.errors import (
    DeleteRefused,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    Unsupported,
    V2Error,
)

if TYPE_CHECKING:
    from docket.registry.services import RegistryServices

log = logging.getLogger(__name__)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
IMAGE_MANIFESTS = frozenset({DOCKER_MANIFEST, OCI_MANIFEST})
INDEXES = frozenset({DOCKER_LIST, OCI_INDEX})
MANIFEST_TYPES = IMAGE_MANIFESTS | INDEXES
SCHEMA1_TYPES = frozenset({"application/vnd.docker.distribution.manifest.v1+json",
                           "application/vnd.docker.distribution.manifest.v1+prettyjws"})
# a Content-Type that says nothing about the manifest: the body's mediaType (or its shape) decides
GENERIC_TYPES = frozenset({"", "application/json", "application/octet-stream"})
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
IMAGE_CONFIGS = frozenset({DOCKER_CONFIG, OCI_CONFIG})
DOCKER_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"  # docket layers: uncompressed, digest = diff_id
# non-distributable ("foreign") layers: fetched from their ``urls``, so a manifest may list them without the blob
DOCKER_FOREIGN_LAYERS = frozenset({"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
                                   "application/vnd.docker.image.rootfs.foreign.diff.tar"})
OCI_NONDISTRIBUTABLE_LAYERS = frozenset({"application/vnd.oci.image.layer.nondistributable.v1.tar",
                                         "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
                                         "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"})
FOREIGN_LAYERS = DOCKER_FOREIGN_LAYERS | OCI_NONDISTRIBUTABLE_LAYERS
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
ORIGIN_V2, ORIGIN_DOCKET = "v2", "docket"


class ManifestTooLarge(V2Error):
    """The spec: registries SHOULD answer 413 to a manifest over their limit (at least 4 MiB must be accepted)."""

    status, code = 413, "MANIFEST_INVALID"


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    artifact_type: str | None = None
    urls: tuple[str, ...] = ()

    @property
    def foreign(self) -> bool:
        """A non-distributable layer with URLs: its bytes live elsewhere (as distribution, the registry does not
        need them); without URLs it is an ordinary blob that must be pushed."""
        return self.media_type in FOREIGN_LAYERS and bool(self.urls)


@dataclass(frozen=True)
class ParsedManifest:
    raw: bytes = field(repr=False)
    digest: str
    media_type: str
    config: Descriptor | None  # image manifests only
    layers: tuple[Descriptor, ...] = ()  # image manifests only
    manifests: tuple[Descriptor, ...] = ()  # indexes only
    subject: Descriptor | None = None
    artifact_type: str | None = None  # as the referrers API reports it (image manifests: else config mediaType)
    annotations: dict[str, str] | None = None

    @property
    def size(self) -> int:
        return len(self.raw)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEXES

    @property
    def blobs(self) -> list[Descriptor]:
        """Config, then layers: the blobs that must be in the store (not foreign layers)."""
        return ([self.config] if self.config is not None else []) + [d for d in self.layers if not d.foreign]

    @property
    def has_foreign_layers(self) -> bool:
        return any(d.foreign for d in self.layers)

    @property
    def refs(self) -> list[tuple[str, str]]:
        out = [(self.config.digest, REF_CONFIG)] if self.config is not None else []
        out += [(d.digest, REF_LAYER) for d in self.layers]
        out += [(d.digest, REF_MANIFEST) for d in self.manifests]
        return out


# -- parsing --------------------------------------------------------------------------------------------------------
def compute_digest(raw: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, raw).hexdigest()}"


def split_reference(reference: str) -> tuple[str | None, str | None]:
    """``<reference>`` of a manifest URL -> (tag, None) or (None, digest). A tag never holds ':', so anything with
    one is a digest: DIGEST_INVALID when it is not sha256/sha512; MANIFEST_INVALID for a malformed tag."""
    if ":" in reference:
        if not ANY_DIGEST_RE.fullmatch(reference):
            raise DigestInvalid(f"invalid digest {reference[:200]!r}",
                                "a digest is sha256: and 64 lowercase hex digits, or sha512: and 128",
                                detail={"digest": reference[:200]})
        return None, reference
    if not TAG_RE.fullmatch(reference):
        raise ManifestInvalid(f"invalid tag {reference[:200]!r}",
                              "a tag is 1-128 of A-Z a-z 0-9 _ . - and does not start with . or -",
                              detail={"tag": reference[:200]})
    return reference, None


def _invalid(message: str, **detail: Any) -> ManifestInvalid:
    return ManifestInvalid(message, "see the OCI image spec (image manifest, image index) or Docker's schema 2",
                           detail=detail or None)


def _descriptor(obj: Any, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise _invalid(f"{where} is not a descriptor object", field=where)
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise _invalid(f"{where}.mediaType is missing or not a string", field=where)
    if not isinstance(digest, str) or not ANY_DIGEST_RE.fullmatch(digest):
        raise _invalid(f"{where}.digest {str(digest)[:200]!r} is not a sha256 or sha512 digest", field=where)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise _invalid(f"{where}.size is missing or not a non-negative integer", field=where)
    artifact_type = obj.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid(f"{where}.artifactType is not a string", field=where)
    return Descriptor(media_type, digest, size, artifact_type, _urls(obj.get("urls"), media_type, where))


_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # control characters and spaces: never in a URI (RFC 3986)


def _urls(value: Any, media_type: str, where: str) -> tuple[str, ...]:
    """A descriptor's ``urls``: absolute http(s) URLs without a fragment (as distribution checks them); a Docker
    foreign layer must have some (it cannot be pushed as a blob)."""
    if value is None:
        if media_type in DOCKER_FOREIGN_LAYERS:
            raise _invalid(f"{where} is a foreign layer without urls", field=where)
        return ()
    if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
        raise _invalid(f"{where}.urls is not a list of strings", field=where)
    for url in value:
        parts = urlsplit(url)  # which drops tabs and newlines silently (WHATWG): refused here, as Go's url.Parse does
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment or len(url) > 2048 \
                or _URL_UNSAFE.search(url):
            raise _invalid(f"{where}.urls has {url[:200]!r}, not an http(s) URL without a fragment", field=where)
    if not value and media_type in DOCKER_FOREIGN_LAYERS:
        raise _invalid(f"{where} is a foreign layer without urls", field=where)
    return tuple(value)


def _descriptors(value: Any, where: str) -> tuple[Descriptor, ...]:
    if not isinstance(value, list):
        raise _invalid(f"{where} is not a list", field=where)
    if len(value) > MAX_LAYERS:  # the limit /api/v1 and the client share (docket/limits.py): before any work
        raise _invalid(f"{where} lists {len(value)} descriptors; the limit is {MAX_LAYERS}", field=where,
                       count=len(value), limit=MAX_LAYERS)
    return tuple(_descriptor(item, f"{where}[{i}]") for i, item in enumerate(value))


def _check_unambiguous(body: dict[str, Any], media_type: str) -> None:
    """A document is an index or an image manifest, never both (CVE-2021-41190: without ``mediaType`` a reader
    could take it for either). As distribution does: an image manifest with ``manifests``, or an index with
    ``config`` or ``layers``, is invalid whatever its media type says."""
    if media_type in INDEXES:
        extra = [k for k in ("config", "layers") if k in body]
        if extra:
            raise _invalid(f"an image index must not have {' or '.join(extra)} (is it an image manifest?)",
                           field=extra[0])
    elif "manifests" in body:
        raise _invalid("an image manifest must not have manifests (is it an index?)", field="manifests")


def parse_manifest(raw: bytes, content_type: str | None, algorithm: str = "sha256") -> ParsedManifest:
    """Check a PUT body against its Content-Type; the digest is ``algorithm`` over the exact bytes."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestTooLarge(f"manifest is {len(raw)} bytes; the limit is {MAX_MANIFEST_BYTES} (4 MiB)",
                               detail={"size": len(raw), "limit": MAX_MANIFEST_BYTES})
    ct = (content_type or "").split(";", 1)[0].strip().lower()
    schema1 = ("Docker schema 1 manifests are not supported",
               "push with a current docker, skopeo or oras: they send Docker schema 2 or OCI manifests")
    if ct in SCHEMA1_TYPES:
        raise Unsupported(*schema1, detail={"mediaType": ct})
    if ct not in GENERIC_TYPES and ct not in MANIFEST_TYPES:
        raise Unsupported(f"unsupported manifest media type {ct[:200]!r}",
                          "send one of " + ", ".join(sorted(MANIFEST_TYPES)), detail={"mediaType": ct[:200]})
    try:  # strict: UTF-8 without BOM, unique keys, no NaN, int64, bounded depth (docket/jsonstrict.py)
        body = jsonstrict.loads(raw, what="manifest", max_bytes=MAX_MANIFEST_BYTES)
    except InvalidJSON as exc:
        raise _invalid(exc.message) from exc
    if not isinstance(body, dict):
        raise _invalid("manifest is not a JSON object")
    version = body.get("schemaVersion")
    if version == 1 and type(version) is int:
        raise ManifestInvalid(*schema1, detail={"schemaVersion": 1})
    if type(version) is not int or version != 2:  # not 2.0 or true: Go clients cannot read those into an int
        raise _invalid(f"schemaVersion must be 2, not {str(version)[:50]}", field="schemaVersion")
    body_type = body.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise _invalid("mediaType is not a string", field="mediaType")
    if ct in GENERIC_TYPES:
        media_type = body_type or (OCI_INDEX if "manifests" in body else OCI_MANIFEST if "config" in body else "")
        if media_type in SCHEMA1_TYPES:
            raise Unsupported(*schema1, detail={"mediaType": media_type})
        if media_type not in MANIFEST_TYPES:
            raise Unsupported(f"cannot tell the manifest's media type (Content-Type {ct or 'missing'!r}, mediaType "
                              f"{str(body_type)[:200]!r})", "send Content-Type: the manifest's media type",
                              detail={"mediaType": body_type})
    else:
        media_type = ct
        if body_type is not None and body_type != ct:
            raise _invalid(f"the manifest's mediaType {body_type[:200]!r} does not match Content-Type {ct!r}",
                           field="mediaType")
    _check_unambiguous(body, media_type)
    subject = _descriptor(body["subject"], "subject") if body.get("subject") is not None else None
    artifact_type = body.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise _invalid("artifactType is not a string", field="artifactType")
    annotations = body.get("annotations")
    if annotations is not None and (not isinstance(annotations, dict)
                                    or not all(isinstance(v, str) for v in annotations.values())):
        raise _invalid("annotations must be an object of strings", field="annotations")
    digest = compute_digest(raw, algorithm)
    if media_type in INDEXES:
        if "manifests" not in body:
            raise _invalid("an image index has no manifests list", field="manifests")
        return ParsedManifest(raw, digest, media_type, None, (), _descriptors(body["manifests"], "manifests"),
                              subject, artifact_type or None, annotations or None)
    if "config" not in body:
        raise _invalid("an image manifest has no config descriptor", field="config")
    config = _descriptor(body["config"], "config")
    layers = _descriptors(body.get("layers", []), "layers")
    return ParsedManifest(raw, digest, media_type, config, layers, (), subject,
                          artifact_type or config.media_type, annotations or None)


def docket_manifest(config: tuple[str, int], layers: list[tuple[str, int]]) -> ParsedManifest:
    """The Docker schema 2 manifest of a ``docket push`` (layers uncompressed: digest = diff_id). Deterministic
    bytes, formatted as Docker prints its own (3-space indent, keys in Docker's order)."""
    body = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "size": config[1], "digest": config[0]},
            "layers": [{"mediaType": DOCKER_LAYER_TAR, "size": size, "digest": digest} for digest, size in layers]}
    return parse_manifest(json.dumps(body, indent=3).encode(), DOCKER_MANIFEST)


# -- rows (callers hold the tag lock) -------------------------------------------------------------------------------
def find_manifest(s: Session, repository: str, digest: str) -> Manifest | None:
    return s.scalars(select(Manifest).where(Manifest.repository == repository, Manifest.digest == digest)).one_or_none()


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


def unused_docket_manifests(s: Session) -> list[Manifest]:
    rows = s.scalars(select(Manifest).where(Manifest.origin == ORIGIN_DOCKET)).all()
    return [row for row in rows if not manifest_in_use(s, row.repository, row.digest)]


def image_digests(image: Image) -> set[str]:
    """Every blob an image row uses (tarball, config, layers)."""
    used = {layer.blob_digest for layer in image.layers}
    used.update(d for d in (image.blob_digest, image.config_digest) if d)
    return used


def open_tag(s: Session, repository: str, tag: str) -> tuple[Image, set[str], str | None]:
    """The tag's row (new, or emptied of its layers) to fill in, with the blobs and manifest it used before."""
    from docket.registry.services import _image_query

    image = s.scalars(_image_query().where(Image.repository == repository, Image.tag == tag)).one_or_none()
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


# -- the service ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageConfig:
    config: dict[str, Any]
    diff_ids: list[str]


class ManifestService:
    """The V2 manifest operations on one registry's store (``RegistryServices.manifests``)."""

    def __init__(self, services: RegistryServices) -> None:
        self.sv = services

    # -- push ---------------------------------------------------------------------------------------------------
    def put(self, repository: str, reference: str, raw: bytes, content_type: str | None,
            tags: tuple[str, ...] = (), digest: str | None = None) -> ParsedManifest:
        """PUT /v2/<name>/manifests/<reference>: check, store the bytes, the row, then point the tags: the
        reference's and ``tags`` (``?tag=``, checked by the caller), in one transaction. ``digest`` (``?digest=``
        of a push by tag) names the digest the bytes must have, and so its algorithm (sha512 stays sha512)."""
        sv = self.sv
        tag, wanted = split_reference(reference)
        if digest is not None:
            if wanted is not None and digest != wanted:
                raise DigestInvalid(f"?digest={digest[:200]} differs from the digest {wanted} in the URL",
                                    detail={"digest": digest[:200]})
            wanted = digest
        all_tags = tuple(dict.fromkeys(((tag,) if tag is not None else ()) + tuple(tags)))
        tag = all_tags[0] if all_tags else None
        algorithm = wanted.split(":", 1)[0] if wanted else "sha256"
        parsed = parse_manifest(raw, content_type, algorithm)
        if wanted is not None and parsed.digest != wanted:
            raise DigestInvalid(f"the manifest's bytes hash to {parsed.digest}, not {wanted}",
                                "PUT the exact bytes whose digest is in the URL", detail={"digest": wanted})
        with sv.db.session() as s:
            self._check_children(s, repository, parsed)
        with contextlib.ExitStack() as stack:
            for digest in sorted({parsed.digest, *(d.digest for d in parsed.blobs)}):
                stack.enter_context(sv.blob_locks.hold(digest))
            seeds: list[tuple[str, str]] = []
            with sv.db.session() as s:
                for desc in parsed.blobs:
                    blob = s.get(Blob, desc.digest)
                    if blob is None or not sv.store.has_blob(desc.digest):
                        what = "config" if desc is parsed.config else "layer"
                        raise ManifestBlobUnknown(f"{what} blob {desc.digest} is not in this registry",
                                                  "push the blob before the manifest", detail={"digest": desc.digest})
                    if blob.size != desc.size:
                        raise _invalid(f"the manifest says blob {desc.digest} has {desc.size} bytes; it has "
                                       f"{blob.size}", digest=desc.digest)
                image_config = self._image_config(parsed) if tag is not None else None
                if image_config is not None:
                    seeds = self._promote_layers_locked(s, [d.digest for d in parsed.layers])
            with sv.store.upload(algorithm) as up:
                up.write(raw)
                up.finish()
                sv._store_locked(up, KIND_MANIFEST)
            for digest, info_hash in seeds:
                sv._seed(digest, info_hash)
            with sv.tag_lock, sv.db.session() as s:
                self._check_children(s, repository, parsed)  # GC may have dropped one meanwhile
                save_manifest_row(s, repository, parsed, ORIGIN_V2)
                for each in all_tags:
                    self._point_tag(s, repository, each, parsed, image_config)
                s.commit()
        log.info("v2 push %s@%s (%s, %d bytes)%s", repository, parsed.digest, parsed.media_type, parsed.size,
                 f" tagged {', '.join(all_tags)}" if all_tags else "")
        return parsed

    def _check_children(self, s: Session, repository: str, parsed: ParsedManifest) -> None:
        for desc in parsed.manifests:
            child = find_manifest(s, repository, desc.digest)
            if child is None:
                raise ManifestBlobUnknown(f"the index lists manifest {desc.digest}, which is not in {repository}",
                                          "push every child manifest (by digest) to this repository before the "
                                          "index", detail={"digest": desc.digest})
            if child.size != desc.size:  # sizes are summed into the tag's size: only true ones
                raise _invalid(f"the index says manifest {desc.digest} has {desc.size} bytes; it has {child.size}",
                               digest=desc.digest)

    def _image_config(self, parsed: ParsedManifest) -> ImageConfig | None:
        """The image config when docket can pull this manifest: an image manifest whose config is an image config
        listing one diff_id per layer. Anything else is an artifact (never an error)."""
        config = parsed.config
        if parsed.is_index or config is None or config.media_type not in IMAGE_CONFIGS \
                or config.size > MAX_CONFIG_BYTES or parsed.has_foreign_layers:
            return None  # foreign layers: not in the store, so no torrents; docket pull refuses such a tag
        try:
            body = jsonstrict.loads(self.sv.store.blob_path(config.digest).read_bytes(), what="image config")
            diff_ids = body["rootfs"]["diff_ids"]
        except (OSError, InvalidJSON, KeyError, TypeError):
            return None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(parsed.layers) \
                or not all(isinstance(d, str) and ANY_DIGEST_RE.fullmatch(d) for d in diff_ids):
            return None
        return ImageConfig(body, diff_ids)

    def _promote_layers_locked(self, s: Session, digests: list[str]) -> list[tuple[str, str]]:
        """Layers of a pullable image become kind "layer" with a torrent (caller holds their blob locks);
        returns (digest, info hash) to seed. A 0-byte blob stays as it is: a torrent cannot describe nothing."""
        sv = self.sv
        changed = False
        seeds = []
        for digest in dict.fromkeys(digests):
            blob = s.get(Blob, digest)
            assert blob is not None
            if blob.size == 0:
                continue
            if blob.kind not in (KIND_LAYER, KIND_TARBALL):
                blob.kind = KIND_LAYER
                changed = True
            changed |= sv._ensure_torrent_locked(s, blob)
            assert blob.info_hash is not None
            seeds.append((digest, blob.info_hash))
        if changed:
            with sv.tag_lock:
                s.commit()
        return seeds

    def _point_tag(self, s: Session, repository: str, tag: str, parsed: ParsedManifest,
                   image_config: ImageConfig | None) -> None:
        image, old, old_manifest = open_tag(s, repository, tag)
        image.blob_digest = None
        image.manifest_digest = parsed.digest
        image.pushed_at = utcnow()
        if image_config is not None:
            assert parsed.config is not None
            image.format = FORMAT_LAYERS
            image.config_digest = image.image_id = parsed.config.digest
            image.created = parse_created(image_config.config.get("created"))
            image.size = sum(d.size for d in parsed.blobs)
            image.layers.extend(
                ImageLayer(position=i, blob_digest=d.digest, media_type=d.media_type,
                           diff_id=None if image_config.diff_ids[i] == d.digest else image_config.diff_ids[i])
                for i, d in enumerate(parsed.layers))
        else:
            image.format = FORMAT_INDEX if parsed.is_index else FORMAT_ARTIFACT
            image.config_digest = None
            image.image_id = parsed.digest
            image.created = parse_created((parsed.annotations or {}).get("org.opencontainers.image.created"))
            image.size = parsed.size + sum(d.size for d in (*parsed.blobs, *parsed.manifests))
        close_tag(s, image, old, old_manifest)

    # -- docket pushes ------------------------------------------------------------------------------------------
    def docket_manifest_for(self, config_digest: str, layers: list[str]) -> ParsedManifest | None:
        """The schema 2 manifest a docket push of these blobs gets; None when a blob is missing (the push fails)."""
        with self.sv.db.session() as s:
            sizes = {}
            for digest in {config_digest, *layers}:
                blob = s.get(Blob, digest)
                if blob is None:
                    return None
                sizes[digest] = blob.size
        return docket_manifest((config_digest, sizes[config_digest]), [(d, sizes[d]) for d in layers])

    def store_docket_manifest_locked(self, parsed: ParsedManifest) -> None:
        """The bytes as a blob of kind "manifest" (caller holds its blob lock; the row comes with the tag)."""
        with self.sv.store.upload() as up:
            up.write(parsed.raw)
            up.finish()
            self.sv._store_locked(up, KIND_MANIFEST)

    def backfill(self) -> int:
        """Start-up: every format "layers" tag without a V2 manifest (pushed before 0003) gets one."""
        with self.sv.db.session() as s:
            todo = [(i.id, i.repository, i.tag) for i in s.scalars(select(Image).where(Image.format == FORMAT_LAYERS))
                    if i.manifest is None]
        done = 0
        for image_id, repository, tag in todo:
            try:
                done += self.backfill_image(image_id)
            except Exception:  # noqa: BLE001 - one bad row must not stop the registry from starting
                log.exception("could not write the V2 manifest of %s:%s", repository, tag)
        if done:
            log.info("wrote V2 manifests for %d tag(s) pushed before the V2 API", done)
        return done

    def backfill_image(self, image_id: int) -> bool:
        sv = self.sv
        with sv.db.session() as s:
            image = s.get(Image, image_id)
            if image is None or image.format != FORMAT_LAYERS or image.config_digest is None:
                return False
            config, layers = image.config_digest, [layer.blob_digest for layer in image.layers]
        parsed = self.docket_manifest_for(config, layers)
        if parsed is None:
            return False
        with sv.blob_locks.hold(parsed.digest):
            self.store_docket_manifest_locked(parsed)
            with sv.tag_lock, sv.db.session() as s:
                image = s.get(Image, image_id)
                if image is None or image.config_digest != config \
                        or [layer.blob_digest for layer in image.layers] != layers:
                    return False  # re-pushed meanwhile: that push wrote its own
                save_manifest_row(s, image.repository, parsed, ORIGIN_DOCKET)
                image.manifest_digest = parsed.digest
                s.commit()
        return True

    # -- reads --------------------------------------------------------------------------------------------------
    def resolve(self, s: Session, repository: str, reference: str) -> Manifest:
        tag, digest = split_reference(reference)
        if tag is not None:
            image = s.scalars(select(Image).where(Image.repository == repository, Image.tag == tag)).one_or_none()
            if image is None:
                raise ManifestUnknown(f"no tag {tag!r} in repository {repository}", detail={"tag": tag})
            if image.format == FORMAT_TARBALL:
                raise ManifestUnknown(f"{repository}:{tag} was pushed as a whole tarball by an old docket; it has "
                                      "no V2 manifest", "push it again (docket push or docker push)",
                                      detail={"tag": tag})
            if image.manifest is None and image.format == FORMAT_LAYERS:
                s.rollback()
                self.backfill_image(image.id)  # pushed before 0003 and not backfilled yet
                s.expire_all()
                image = s.scalars(select(Image).where(Image.repository == repository, Image.tag == tag)).one()
            digest = image.manifest_digest
        assert digest is not None
        row = find_manifest(s, repository, digest)
        if row is None:
            raise ManifestUnknown(f"no manifest {digest} in repository {repository}", detail={"digest": digest})
        return row

    def read(self, s: Session, repository: str, reference: str) -> tuple[bytes, Manifest]:
        row = self.resolve(s, repository, reference)
        self.sv.scrubber.check_servable(row.digest)
        try:
            return self.sv.store.blob_path(row.digest).read_bytes(), row
        except FileNotFoundError as exc:
            raise ManifestUnknown(f"manifest {row.digest} is missing from the store",
                                  "push it again", detail={"digest": row.digest}) from exc

    def tags(self, s: Session, repository: str) -> list[str]:
        tags = sorted(s.scalars(select(Image.tag).where(Image.repository == repository)))
        if not tags and s.scalars(select(Manifest.id).where(Manifest.repository == repository).limit(1)).first() \
                is None:
            raise NameUnknown(f"no repository {repository} in this registry", detail={"name": repository})
        return tags

    def repositories(self, s: Session) -> list[str]:
        return sorted(set(s.scalars(select(Image.repository).distinct()))
                      | set(s.scalars(select(Manifest.repository).distinct())))

    def referrers(self, s: Session, repository: str, digest: str, artifact_type: str | None) -> list[dict[str, Any]]:
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

    # -- deletes ------------------------------------------------------------------------------------------------
    def delete(self, repository: str, reference: str) -> None:
        """By digest: the manifest and every tag of it in this repository (refused while an index of the
        repository lists it). By tag: only the tag."""
        tag, digest = split_reference(reference)
        if tag is not None:
            from docket.errors import NotFound

            try:
                self.sv.delete_tag(repository, tag)
            except NotFound as exc:
                raise ManifestUnknown(f"no tag {tag!r} in repository {repository}", detail={"tag": tag}) from exc
            return
        assert digest is not None
        from docket.registry.services import _image_query

        with self.sv.tag_lock, self.sv.db.session() as s:
            row = find_manifest(s, repository, digest)
            if row is None:
                raise ManifestUnknown(f"no manifest {digest} in repository {repository}", detail={"digest": digest})
            parents = parent_indexes(s, repository, digest)
            if parents:
                raise DeleteRefused(f"manifest {digest} is listed by the index {parents[0]} in {repository}",
                                    "delete the index first", detail={"digest": digest, "indexes": parents})
            images = s.scalars(_image_query().where(Image.repository == repository,
                                                    Image.manifest_digest == digest)).all()
            for image in images:
                drop_tag(s, image)
            drop_manifest_row(s, row)
            s.commit()
        log.info("deleted manifest %s@%s and its %d tag(s)", repository, digest, len(images))

    def collect(self) -> int:
        """GC: drop manifests docket wrote whose tags are gone (their bytes and blobs become unreferenced)."""
        dropped = 0
        while True:  # dropping an index can free the manifests it listed
            with self.sv.tag_lock, self.sv.db.session() as s:
                rows = unused_docket_manifests(s)
                for row in rows:
                    drop_manifest_row(s, row)
                s.commit()
            dropped += len(rows)
            if not rows:
                return dropped


