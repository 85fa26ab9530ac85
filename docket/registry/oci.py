"""V2 / OCI manifest documents (docs/v2.md): media types, descriptors, and the checks of a pushed manifest.

``parse_manifest`` checks a PUT body against its Content-Type the way distribution does (strict JSON, one document
kind, descriptors with valid digests, sizes and URLs); ``docket_manifest`` writes the Docker schema 2 manifest a
``docket push`` gets. Pure functions: no database, no store.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from docket import jsonstrict
from docket.errors import DigestInvalid, InvalidJSON, ManifestInvalid, ManifestTooLarge, Unsupported
from docket.limits import MAX_LAYERS
from docket.reference import ANY_DIGEST_RE, TAG_RE
from docket.registry.models import REF_CONFIG, REF_LAYER, REF_MANIFEST


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
# RFC 6838: type and subtype at most 127 characters each. The database columns are varchar(255), which PostgreSQL
# enforces (SQLite does not): a longer one is refused here, on every database, as the client's error.
MAX_MEDIA_TYPE = 255


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


def invalid_manifest(message: str, **detail: Any) -> ManifestInvalid:
    return ManifestInvalid(message, "see the OCI image spec (image manifest, image index) or Docker's schema 2",
                           detail=detail or None)


def _descriptor(obj: Any, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise invalid_manifest(f"{where} is not a descriptor object", field=where)
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise invalid_manifest(f"{where}.mediaType is missing or not a string", field=where)
    _check_media_type_length(media_type, f"{where}.mediaType")
    if not isinstance(digest, str) or not ANY_DIGEST_RE.fullmatch(digest):
        raise invalid_manifest(f"{where}.digest {str(digest)[:200]!r} is not a sha256 or sha512 digest", field=where)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise invalid_manifest(f"{where}.size is missing or not a non-negative integer", field=where)
    artifact_type = obj.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise invalid_manifest(f"{where}.artifactType is not a string", field=where)
    if artifact_type is not None:
        _check_media_type_length(artifact_type, f"{where}.artifactType")
    return Descriptor(media_type, digest, size, artifact_type, _urls(obj.get("urls"), media_type, where))


def _check_media_type_length(value: str, where: str) -> None:
    if len(value) > MAX_MEDIA_TYPE:
        raise invalid_manifest(f"{where} is {len(value)} characters long; a media type has at most {MAX_MEDIA_TYPE}",
                               field=where, limit=MAX_MEDIA_TYPE)


_URL_UNSAFE = re.compile(r"[\x00-\x20\x7f]")  # control characters and spaces: never in a URI (RFC 3986)


def _urls(value: Any, media_type: str, where: str) -> tuple[str, ...]:
    """A descriptor's ``urls``: absolute http(s) URLs without a fragment (as distribution checks them); a Docker
    foreign layer must have some (it cannot be pushed as a blob)."""
    if value is None:
        if media_type in DOCKER_FOREIGN_LAYERS:
            raise invalid_manifest(f"{where} is a foreign layer without urls", field=where)
        return ()
    if not isinstance(value, list) or not all(isinstance(u, str) for u in value):
        raise invalid_manifest(f"{where}.urls is not a list of strings", field=where)
    for url in value:
        parts = urlsplit(url)  # which drops tabs and newlines silently (WHATWG): refused here, as Go's url.Parse does
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.fragment or len(url) > 2048 \
                or _URL_UNSAFE.search(url):
            raise invalid_manifest(f"{where}.urls has {url[:200]!r}, not an http(s) URL without a fragment", field=where)
    if not value and media_type in DOCKER_FOREIGN_LAYERS:
        raise invalid_manifest(f"{where} is a foreign layer without urls", field=where)
    return tuple(value)


def _descriptors(value: Any, where: str) -> tuple[Descriptor, ...]:
    if not isinstance(value, list):
        raise invalid_manifest(f"{where} is not a list", field=where)
    if len(value) > MAX_LAYERS:  # the limit /api/v1 and the client share (docket/limits.py): before any work
        raise invalid_manifest(f"{where} lists {len(value)} descriptors; the limit is {MAX_LAYERS}", field=where,
                       count=len(value), limit=MAX_LAYERS)
    return tuple(_descriptor(item, f"{where}[{i}]") for i, item in enumerate(value))


def _check_unambiguous(body: dict[str, Any], media_type: str) -> None:
    """A document is an index or an image manifest, never both (CVE-2021-41190: without ``mediaType`` a reader
    could take it for either). As distribution does: an image manifest with ``manifests``, or an index with
    ``config`` or ``layers``, is invalid whatever its media type says."""
    if media_type in INDEXES:
        extra = [k for k in ("config", "layers") if k in body]
        if extra:
            raise invalid_manifest(f"an image index must not have {' or '.join(extra)} (is it an image manifest?)",
                           field=extra[0])
    elif "manifests" in body:
        raise invalid_manifest("an image manifest must not have manifests (is it an index?)", field="manifests")


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
        raise invalid_manifest(exc.message) from exc
    if not isinstance(body, dict):
        raise invalid_manifest("manifest is not a JSON object")
    version = body.get("schemaVersion")
    if version == 1 and type(version) is int:
        raise ManifestInvalid(*schema1, detail={"schemaVersion": 1})
    if type(version) is not int or version != 2:  # not 2.0 or true: Go clients cannot read those into an int
        raise invalid_manifest(f"schemaVersion must be 2, not {str(version)[:50]}", field="schemaVersion")
    body_type = body.get("mediaType")
    if body_type is not None and not isinstance(body_type, str):
        raise invalid_manifest("mediaType is not a string", field="mediaType")
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
            raise invalid_manifest(f"the manifest's mediaType {body_type[:200]!r} does not match Content-Type {ct!r}",
                           field="mediaType")
    _check_unambiguous(body, media_type)
    subject = _descriptor(body["subject"], "subject") if body.get("subject") is not None else None
    artifact_type = body.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise invalid_manifest("artifactType is not a string", field="artifactType")
    if artifact_type is not None:
        _check_media_type_length(artifact_type, "artifactType")
    annotations = body.get("annotations")
    if annotations is not None and (not isinstance(annotations, dict)
                                    or not all(isinstance(v, str) for v in annotations.values())):
        raise invalid_manifest("annotations must be an object of strings", field="annotations")
    digest = compute_digest(raw, algorithm)
    if media_type in INDEXES:
        if "manifests" not in body:
            raise invalid_manifest("an image index has no manifests list", field="manifests")
        return ParsedManifest(raw, digest, media_type, None, (), _descriptors(body["manifests"], "manifests"),
                              subject, artifact_type or None, annotations or None)
    if "config" not in body:
        raise invalid_manifest("an image manifest has no config descriptor", field="config")
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
