"""The /api/v1 blueprint: push, metadata, listing, blobs, torrents, tracker whitelist. JSON everywhere.

The views parse requests, call the components (``app.extensions["docket"]``) and write the answers: the image
record of docs/http-api.md and docs/layers.md, with its URLs, is built here."""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request

from docket import jsonstrict
from docket.errors import DocketError, IntegrityError, InvalidJSON, InvalidRequest, NotFound
from docket.limits import MAX_LAYERS  # the one limit of /api/v1, /v2 and the client
from docket.reference import validate_repository, validate_tag
from docket.registry.bodies import check_body_headers, read_small, receive, send_blob, send_ranged_file
from docket.registry.components import Components
from docket.registry.db import get_session
from docket.registry.models import FORMAT_LAYERS, FORMAT_TARBALL, KIND_CONFIG, KIND_LAYER, Image
from docket.registry.oci import DOCKER_LAYER_TAR
from docket.registry.queries import find_image, image_by_id, list_images as all_images, whitelist
from docket.registry.retention import RetentionPolicy, check_keep_tags
from docket.registry.store import digest_hex, validate_digest

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api/v1")

ACCEPTED_TYPES = {"application/x-tar", "application/tar", "application/octet-stream"}
MANIFEST_TYPES = {"application/json", "application/vnd.docket.manifest.v1+json"}
MAX_MANIFEST_BYTES = 1024 * 1024
UPLOAD_KINDS = (KIND_LAYER, KIND_CONFIG)


class UnsupportedMediaType(DocketError):
    status, code, exit_code = 415, "UNSUPPORTED_MEDIA_TYPE", 2


def services() -> Components:
    return current_app.extensions["docket"]


def rfc3339(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def image_record(image: Image) -> dict[str, Any]:
    """The image record of docs/http-api.md (format "tarball"), docs/layers.md (format "layers") or docs/v2.md
    (formats "index" and "artifact": V2 manifests docket cannot pull)."""
    head = {"repository": image.repository, "tag": image.tag, "ref": image.ref, "image_id": image.image_id,
            "created": rfc3339(image.created), "size": image.size}
    if image.format == FORMAT_TARBALL:  # a record start-up could not convert to layers (tarball.py)
        blob = image.blob
        assert blob is not None
        return {**head, "digest": blob.digest, "info_hash": blob.info_hash, "piece_length": blob.piece_length,
                "pushed_at": rfc3339(image.pushed_at), "torrent_url": f"/api/v1/blobs/{blob.digest}/torrent",
                "blob_url": f"/api/v1/blobs/{blob.digest}", "format": FORMAT_TARBALL}
    manifest = image.manifest
    v2 = {"digest": image.manifest_digest, "manifest_digest": image.manifest_digest,
          "media_type": manifest.media_type if manifest is not None else None}
    if image.format != FORMAT_LAYERS:  # "index", "artifact": pushed through /v2, not pullable by docket
        return {**head, "pushed_at": rfc3339(image.pushed_at), "format": image.format, **v2,
                "artifact_type": manifest.artifact_type if manifest is not None else None,
                "manifest_url": f"/v2/{image.repository}/manifests/{image.manifest_digest}"}
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


def _pushed(repository: str, tag: str, image_id: int) -> tuple[Response, int, dict[str, str]]:
    """201 with the record of the tag as this push committed it."""
    record = image_record(image_by_id(get_session(), image_id))
    return jsonify(record), 201, {"Location": f"/api/v1/repositories/{repository}/tags/{tag}"}


def _image(repository: str, tag: str) -> Image:
    image = find_image(get_session(), repository, tag)
    if image is None:
        raise NotFound(f"no image {repository}:{tag} in this registry", "list images with GET /api/v1/images")
    return image


@bp.put("/repositories/<path:repository>/tags/<tag>")
def push(repository: str, tag: str) -> tuple[Response, int, dict[str, str]]:
    """Stream the body to a temp file (sha256 while receiving), check, split into layer and config blobs (stored,
    torrented, seeded), then tag. The temporary tarball is deleted when this returns."""
    validate_repository(repository)
    validate_tag(tag)
    sv = services()
    if request.mimetype and request.mimetype not in ACCEPTED_TYPES:
        raise UnsupportedMediaType(f"unsupported Content-Type {request.mimetype!r}",
                                   "send the `docker save` tarball as application/x-tar")
    what = "`docker save` tarball"
    length = check_body_headers(what)
    with sv.store.upload() as up:
        receive(up, length, what)
        image_id = sv.tarballs.publish(up.path, up.size, repository, tag)
    return _pushed(repository, tag, image_id)


@bp.post("/blobs")
def upload_blob() -> tuple[Response, int, dict[str, str]]:
    """One layer or config blob, streamed and hashed while received; checked against ``digest`` when given.
    A layer is torrented, whitelisted and seeded before the answer. 201 new, 200 already present."""
    sv = services()
    kind = request.args.get("kind")
    if kind not in UPLOAD_KINDS:
        raise InvalidRequest(f"kind must be one of {', '.join(UPLOAD_KINDS)}, not {kind!r}",
                             "POST /api/v1/blobs?kind=layer (or kind=config)")
    expected = request.args.get("digest")
    if expected is not None:
        validate_digest(expected)
    if request.mimetype and request.mimetype not in ACCEPTED_TYPES | {"application/json"}:
        raise UnsupportedMediaType(f"unsupported Content-Type {request.mimetype!r}",
                                   "send the blob as application/octet-stream")
    what = f"{kind} blob"
    length = check_body_headers(what)
    with sv.store.upload(pieces=kind == KIND_LAYER, expected_size=length) as up:
        receive(up, length, what)
        if expected is not None and up.digest != expected:
            raise IntegrityError(f"the uploaded {kind} blob has digest {up.digest}, not {expected}",
                                 "the bytes changed in transit or the digest is wrong; nothing was stored")
        blob, created = sv.blobs.store_upload(up, kind)
    answer = {"digest": blob.digest, "size": blob.size, "kind": blob.kind, "info_hash": blob.info_hash}
    return jsonify(answer), 201 if created else 200, {"Location": f"/api/v1/blobs/{blob.digest}"}


def _manifest_body() -> tuple[str, list[str]]:
    """``{"config": digest, "layers": [digest, ...]}`` from the request body, or InvalidRequest."""
    if request.mimetype and request.mimetype not in MANIFEST_TYPES:
        raise UnsupportedMediaType(f"unsupported Content-Type {request.mimetype!r}",
                                   "send the manifest as application/json")
    raw = read_small(MAX_MANIFEST_BYTES, "manifest")
    hint = 'the body is {"config": "sha256:<hex>", "layers": ["sha256:<hex>", ...]} (layers base first)'
    try:  # strict: UTF-8 without BOM, unique keys, no NaN, int64, bounded depth (docket/jsonstrict.py)
        body = jsonstrict.loads(raw, what="manifest", max_bytes=MAX_MANIFEST_BYTES)
    except InvalidJSON as exc:
        raise InvalidJSON(exc.message, hint) from exc
    if not isinstance(body, dict) or not isinstance(body.get("config"), str) or \
            not isinstance(body.get("layers"), list) or not all(isinstance(x, str) for x in body["layers"]):
        raise InvalidRequest("manifest must be an object with a config digest and a list of layer digests", hint)
    if len(body["layers"]) > MAX_LAYERS:
        raise InvalidRequest(f"manifest lists {len(body['layers'])} layers; the limit is {MAX_LAYERS}")
    validate_digest(body["config"])
    for digest in body["layers"]:
        validate_digest(digest)
    return body["config"], list(body["layers"])


@bp.put("/repositories/<path:repository>/manifests/<tag>")
def put_manifest(repository: str, tag: str) -> tuple[Response, int, dict[str, str]]:
    """Tag an image made of blobs already uploaded; 404 names the first missing blob."""
    validate_repository(repository)
    validate_tag(tag)
    config, layers = _manifest_body()
    return _pushed(repository, tag, services().manifests.docket_push(repository, tag, config, layers))


@bp.get("/repositories/<path:repository>/manifests/<tag>")
def get_manifest(repository: str, tag: str) -> Response:
    validate_repository(repository)
    validate_tag(tag)
    image = _image(repository, tag)
    if image.format != FORMAT_LAYERS or image.config_digest is None:
        raise NotFound(f"{repository}:{tag} was pushed as a whole tarball (format tarball): it has no manifest",
                       "GET /api/v1/repositories/<repository>/tags/<tag> describes it")
    # the manifest of docs/layers.md; its sha256 is the record's layers digest
    body = json.dumps({"config": image.config_digest, "layers": [layer.blob_digest for layer in image.layers]},
                      separators=(",", ":"), sort_keys=True).encode()
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    resp = Response(body, mimetype="application/json")
    resp.headers["Docket-Content-Digest"] = digest
    resp.set_etag(digest)
    return resp.make_conditional(request)  # If-None-Match: the digest -> 304, as under /v2


@bp.get("/repositories/<path:repository>/tags/<tag>")
def get_image(repository: str, tag: str) -> Response:
    validate_repository(repository)
    validate_tag(tag)
    return jsonify(image_record(_image(repository, tag)))


@bp.delete("/repositories/<path:repository>/tags/<tag>")
def delete_image(repository: str, tag: str) -> tuple[str, int]:
    """``?prune=true`` (``docket rm``): the manifest goes too once unused, whoever pushed it, so GC frees it."""
    validate_repository(repository)
    validate_tag(tag)
    prune = request.args.get("prune", "false")
    if prune not in ("true", "false"):
        raise InvalidRequest(f"prune must be true or false, not {prune!r}")
    services().manifests.delete_tag(repository, tag, prune=prune == "true")
    return "", 204


@bp.get("/images")
def list_images() -> Response:
    return jsonify({"images": [image_record(i) for i in all_images(get_session())]})


@bp.get("/blobs/<digest>")
def get_blob(digest: str) -> Response:
    """Plain HTTP download (fallback and seed of last resort); Range, If-None-Match handled by send_file."""
    validate_digest(digest)
    services().blobs.servable(get_session(), digest, head=request.method == "HEAD")
    return send_blob(digest, "Docket-Content-Digest", download_name=f"{digest_hex(digest)}.tar")


@bp.get("/blobs/<digest>/torrent")
def get_torrent(digest: str) -> Response:
    validate_digest(digest)
    sv = services()
    blob = sv.blobs.servable(get_session(), digest)
    if blob.info_hash is None or not sv.swarm.torrent_path(digest).is_file():
        raise NotFound(f"blob {digest} is a {blob.kind} blob: it has no torrent",
                       "download it over plain HTTP: GET /api/v1/blobs/<digest>")
    resp = send_ranged_file(sv.swarm.torrent_path(digest), mimetype="application/x-bittorrent", etag=blob.info_hash,
                            max_age=0, download_name=f"{digest_hex(digest)}.torrent")  # Range per RFC 9110
    resp.headers["Docket-Info-Hash"] = blob.info_hash
    return resp


@bp.get("/tracker/whitelist")
def tracker_whitelist() -> Response:
    """What an external opentracker's whitelist must contain: every stored blob's info hash."""
    hashes = whitelist(get_session())
    return Response("".join(f"{h}\n" for h in hashes), mimetype="text/plain")


@bp.get("/tracker")
def tracker_info() -> Response:
    sv = services()
    return jsonify({"announce_url": sv.swarm.announce_url, "managed": sv.swarm.tracker.managed})


@bp.get("/seeders")
def list_seeders() -> Response:
    """Admin view: one entry per seeded blob, with the ctorrent pid."""
    sv = services()
    snap = sv.swarm.snapshot()
    return jsonify({"enabled": sv.swarm.seeding,
                    "seeders": [{"digest": d, **info} for d, info in sorted(snap.items())]})


@bp.post("/admin/scrub")
def scrub_now() -> Response:
    """Admin: re-hash every blob now (synchronously; a pass already running is waited for). Needs a push token
    when the registry has push tokens."""
    sv = services()
    sv.scrubber.run_once()
    return jsonify(sv.scrubber.status())


MAX_ADMIN_BODY = 64 * 1024
RETENTION_KEYS = {"dry_run", "keep_tags", "keep_patterns"}


def _admin_body() -> dict[str, Any]:
    """An optional small JSON object body (empty: ``{}``)."""
    raw = read_small(MAX_ADMIN_BODY, "request body")
    if not raw.strip():
        return {}
    if request.mimetype and request.mimetype != "application/json":
        raise UnsupportedMediaType(f"unsupported Content-Type {request.mimetype!r}", "send JSON")
    body = jsonstrict.loads(raw, what="request body", max_bytes=MAX_ADMIN_BODY)
    if not isinstance(body, dict):
        raise InvalidRequest("the body must be a JSON object", '{"dry_run": false, "keep_tags": 3}')
    return body


def _retention_request() -> tuple[bool, RetentionPolicy | None]:
    """(dry run, the one-off policy or None for the registry's) from the query and/or a JSON body."""
    hint = ('query: ?dry_run=false&keep_tags=3&keep_pattern=v1* (repeatable); or a JSON body '
            '{"dry_run": false, "keep_tags": 3, "keep_patterns": ["v1*"]}')
    body = _admin_body()
    unknown = sorted(set(body) - RETENTION_KEYS) + sorted(set(request.args) - {"dry_run", "keep_tags",
                                                                                 "keep_pattern"})
    if unknown:
        raise InvalidRequest(f"unknown parameter {unknown[0]!r}", hint)
    both = {"dry_run", "keep_tags"} & set(body) & set(request.args) | \
        ({"keep_patterns"} if "keep_patterns" in body and "keep_pattern" in request.args else set())
    if both:
        raise InvalidRequest(f"{sorted(both)[0]} is given in both the query and the body", hint)
    dry_run: object = body.get("dry_run", True)
    if "dry_run" in request.args:
        dry_run = {"true": True, "1": True, "false": False, "0": False}.get(request.args["dry_run"].lower(),
                                                                           request.args["dry_run"])
    if not isinstance(dry_run, bool):
        raise InvalidRequest(f"dry_run must be true or false, not {dry_run!r}", hint)
    keep_tags: object = body.get("keep_tags")
    if "keep_tags" in request.args:
        text = request.args["keep_tags"]
        keep_tags = int(text) if text.isdigit() and len(text) < 10 else text
    patterns: object = body.get("keep_patterns")
    if "keep_pattern" in request.args:
        patterns = request.args.getlist("keep_pattern")
    if keep_tags is None and patterns is None:
        return dry_run, None
    if patterns is not None and not isinstance(patterns, list):
        raise InvalidRequest(f"keep_patterns must be a list of patterns, not {patterns!r}", hint)
    configured = services().retention.policy
    policy = RetentionPolicy(configured.keep_tags if keep_tags is None else check_keep_tags(keep_tags),
                             configured.keep_patterns if patterns is None else tuple(patterns))
    return dry_run, policy


@bp.post("/admin/retention")
def retention_now() -> Response:
    """Admin: the retention policy now (push token). A dry run unless ``dry_run=false``: it lists what would
    go and removes nothing. ``keep_tags``/``keep_pattern`` give a one-off policy instead of the registry's."""
    dry_run, policy = _retention_request()
    plan = services().retention.apply(dry_run, policy)
    return jsonify({"dry_run": dry_run, "policy": plan.policy.describe(),
                    "removed": [c.describe() for c in plan.remove], "kept": plan.kept})
