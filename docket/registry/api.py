"""The /api/v1 blueprint: push, metadata, listing, blobs, torrents, tracker whitelist. JSON everywhere."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import select
from flask import Blueprint, Response, current_app, jsonify, request, send_file
from werkzeug.exceptions import ClientDisconnected

from docket.errors import DocketError, InvalidRequest, TooLarge
from docket.reference import validate_repository, validate_tag
from docket.registry.db import get_session
from docket.registry.models import Blob
from docket.registry.store import digest_hex, validate_digest

log = logging.getLogger(__name__)

bp = Blueprint("api", __name__, url_prefix="/api/v1")

ACCEPTED_TYPES = {"application/x-tar", "application/tar", "application/octet-stream"}
BLOB_MAX_AGE = 365 * 24 * 3600  # blobs are immutable: cache them forever


class LengthRequired(DocketError):
    status, code, exit_code = 411, "LENGTH_REQUIRED", 2


class UnsupportedMediaType(DocketError):
    status, code, exit_code = 415, "UNSUPPORTED_MEDIA_TYPE", 2


def services() -> Any:
    return current_app.extensions["docket"]


class _ReleaseOnClose:
    """A response body that runs ``on_close`` exactly once when the server closes it (sent or aborted)."""

    def __init__(self, inner: Any, on_close: Any) -> None:
        self._inner = inner
        self._on_close = on_close

    def __iter__(self) -> Any:
        return iter(self._inner)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


@bp.put("/repositories/<path:repository>/tags/<tag>")
def push(repository: str, tag: str) -> tuple[Response, int, dict[str, str]]:
    """Stream the body to a temp file (sha256 while receiving), check, store, torrent, seed, then tag."""
    validate_repository(repository)
    validate_tag(tag)
    sv = services()
    limit = sv.config.max_upload_size
    if request.mimetype and request.mimetype not in ACCEPTED_TYPES:
        raise UnsupportedMediaType(f"unsupported Content-Type {request.mimetype!r}",
                                   "send the `docker save` tarball as application/x-tar")
    length = request.content_length
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if length is None and not chunked:
        raise LengthRequired("Content-Length is required", "send Content-Length or use chunked transfer encoding")
    if length is not None and length > limit:
        raise TooLarge(f"image tarball is {_human(length)}; this registry accepts up to {_human(limit)}",
                       "ask the operator to raise --max-upload-size")
    if length == 0:
        raise InvalidRequest("empty request body", "the body must be the `docker save` tarball")
    stream = request.stream
    chunk_size = sv.config.chunk_size
    with sv.store.upload() as up:
        while True:
            try:
                chunk = stream.read(chunk_size)
            except (ClientDisconnected, OSError) as exc:
                raise InvalidRequest(
                    f"request body ended after {up.size} of {length if length is not None else '?'} bytes",
                    "the client disconnected or timed out; push again",
                ) from exc
            if not chunk:
                break
            up.write(chunk)
            if up.size > limit:
                raise TooLarge(f"image tarball exceeds {_human(limit)}", "ask the operator to raise --max-upload-size")
        if length is not None and up.size != length:
            raise InvalidRequest(f"request body ended after {up.size} of {length} bytes",
                                 "the client disconnected; push again")
        if up.size == 0:
            raise InvalidRequest("empty request body", "the body must be the `docker save` tarball")
        up.finish()
        record = sv.publish(up, repository, tag)
    location = f"/api/v1/repositories/{repository}/tags/{tag}"
    return jsonify(record), 201, {"Location": location}


@bp.get("/repositories/<path:repository>/tags/<tag>")
def get_image(repository: str, tag: str) -> Response:
    validate_repository(repository)
    validate_tag(tag)
    return jsonify(services().get_image(get_session(), repository, tag))


@bp.delete("/repositories/<path:repository>/tags/<tag>")
def delete_image(repository: str, tag: str) -> tuple[str, int]:
    validate_repository(repository)
    validate_tag(tag)
    services().delete_tag(repository, tag)
    return "", 204


@bp.get("/images")
def list_images() -> Response:
    return jsonify({"images": services().list_images(get_session())})


@bp.get("/blobs/<digest>")
def get_blob(digest: str) -> Response:
    """Plain HTTP download (fallback and seed of last resort); Range, If-None-Match handled by send_file."""
    validate_digest(digest)
    sv = services()
    sv.get_blob(get_session(), digest)
    sv.downloads.acquire(digest)  # GC waits for in-flight downloads
    try:
        resp = send_file(sv.store.blob_path(digest), mimetype="application/octet-stream", conditional=True,
                         etag=digest, max_age=BLOB_MAX_AGE, download_name=f"{digest_hex(digest)}.tar")
    except BaseException:
        sv.downloads.release(digest)
        raise
    # werkzeug hands a direct-passthrough body to the server as is (call_on_close would never run): wrap it
    resp.response = _ReleaseOnClose(resp.response, lambda: sv.downloads.release(digest))
    resp.headers["Docket-Content-Digest"] = digest
    resp.cache_control.immutable = True
    return resp


@bp.get("/blobs/<digest>/torrent")
def get_torrent(digest: str) -> Response:
    validate_digest(digest)
    sv = services()
    blob = sv.get_blob(get_session(), digest)
    resp = send_file(sv.store.torrent_path(digest), mimetype="application/x-bittorrent", conditional=True,
                     etag=blob.info_hash, max_age=0, download_name=f"{digest_hex(digest)}.torrent")
    resp.headers["Docket-Info-Hash"] = blob.info_hash
    return resp


@bp.get("/tracker/whitelist")
def tracker_whitelist() -> Response:
    """What an external opentracker's whitelist must contain: every stored blob's info hash."""
    hashes = sorted(get_session().scalars(select(Blob.info_hash)))
    return Response("".join(f"{h}\n" for h in hashes), mimetype="text/plain")


@bp.get("/tracker")
def tracker_info() -> Response:
    sv = services()
    return jsonify({"announce_url": sv.tracker.announce_url, "managed": sv.tracker.managed})


@bp.get("/seeders")
def list_seeders() -> Response:
    """Admin view: one entry per seeded blob, with the ctorrent pid."""
    sv = services()
    snap = sv.seeders.snapshot() if sv.seeders is not None else {}
    return jsonify({"enabled": sv.seeders is not None,
                    "seeders": [{"digest": d, **info} for d, info in sorted(snap.items())]})
