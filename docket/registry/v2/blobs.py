"""V2 blob routes: GET/HEAD/DELETE blobs, uploads (monolithic, chunked, cross-repository mount). See docs/v2.md.

Blobs are global (content-addressed): ``<name>`` is validated but any stored blob is served from any repository.
Upload sessions are ``docket.registry.uploads.UploadSessions``; a session belongs to the repository it was opened
for. The views parse requests and build the spec's headers; storing, keeping and deleting are ``Blobs``'.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import Any

from flask import Response, current_app, jsonify, request

from docket.errors import (
    BlobUnknown, BlobUploadInvalid, DeleteRefused, DigestInvalid, DistributionError, InvalidRequest, NotFound,
    RangeInvalid, SizeInvalid, TooLarge,
)
from docket.registry.bodies import LengthRequired, check_body_headers, is_chunked, receive, send_blob
from docket.registry.components import Components
from docket.registry.db import get_session
from docket.registry.models import KIND_BLOB
from docket.registry.store import validate_digest
from docket.registry.uploads import UploadSession
from docket.registry.v2 import bp, validate_name
from docket.registry.edges import v2_error

# the spec's Content-Range is "<start>-<end>"; "bytes <start>-<end>/<total>" (RFC 9110) is accepted too
CONTENT_RANGE_RE = re.compile(r"\A\s*(?:bytes[ =])?\s*(\d{1,19})-(\d{1,19})(?:/(?:\d{1,19}|\*))?\s*\Z")


class V2LengthRequired(DistributionError):
    status, code = 411, "SIZE_INVALID"


def services() -> Components:
    return current_app.extensions["docket"]


def _digest(value: str | None, what: str = "digest") -> str:
    if value is None:
        raise DigestInvalid(f"the {what} parameter is missing", "finish an upload with PUT <location>?digest=<digest>")
    try:
        return validate_digest(value)
    except InvalidRequest as exc:
        raise DigestInvalid(exc.message, exc.hint, detail={what: value[:300]}) from exc


def _blob_headers(name: str, digest: str) -> dict[str, str]:
    return {"Location": f"/v2/{name}/blobs/{digest}", "Docker-Content-Digest": digest}


def _session_headers(session: UploadSession) -> dict[str, str]:
    return {"Location": f"/v2/{session.name}/blobs/uploads/{session.id}", "Range": session.range,
            "Docker-Upload-UUID": session.id}


@contextlib.contextmanager
def _spec_body_errors() -> Iterator[None]:
    """The shared body checks raise /api/v1 errors; under /v2 they become the spec's codes."""
    try:
        yield
    except LengthRequired as exc:
        raise V2LengthRequired(exc.message, exc.hint) from exc
    except InvalidRequest as exc:
        raise BlobUploadInvalid(exc.message, exc.hint) from exc


# -- blobs ------------------------------------------------------------------------------------------------------
@bp.get("/<path:name>/blobs/<digest>")
def get_blob(name: str, digest: str) -> Response:
    """The blob's bytes (HEAD: headers only); Range (206/416), If-None-Match handled by send_file."""
    validate_name(name)
    digest = _digest(digest)
    try:
        services().blobs.servable(get_session(), digest, head=request.method == "HEAD")
        return send_blob(digest, "Docker-Content-Digest")
    except NotFound as exc:  # unknown, or deleted between the row and the file
        raise BlobUnknown(exc.message, exc.hint, detail={"digest": digest}) from exc


@bp.delete("/<path:name>/blobs/<digest>")
def delete_blob(name: str, digest: str) -> Any:
    """202 when deleted; 405 (the spec's codes for this route are 202, 404 and 405) while a tag or manifest uses
    it: blobs are shared by every repository, so deleting one a manifest lists would break that manifest. A
    download in flight keeps the bytes it has opened and does not stop the delete."""
    validate_name(name)
    digest = _digest(digest)
    try:
        services().blobs.delete(digest)
    except DeleteRefused as exc:
        return jsonify(v2_error(exc)[0]), exc.status, {"Allow": "GET, HEAD"}
    return "", 202


# -- uploads ----------------------------------------------------------------------------------------------------
def _monolithic(name: str, digest: str) -> tuple[str, int, dict[str, str]]:
    """``POST ...?digest=``: the whole blob in one request, checked against the digest before it is stored."""
    sv = services()
    what = "blob"
    with _spec_body_errors():
        length = check_body_headers(what, allow_empty=True)
    with sv.store.upload(digest.partition(":")[0]) as up:
        with _spec_body_errors():
            receive(up, length, what, allow_empty=True)
        if up.digest != digest:
            raise DigestInvalid(f"the uploaded blob has digest {up.digest}, not {digest}",
                                "the bytes changed in transit or the digest is wrong; nothing was stored",
                                detail={"digest": digest, "computed": up.digest})
        sv.blobs.store_upload(up, KIND_BLOB)
    return "", 201, _blob_headers(name, digest)


@bp.post("/<path:name>/blobs/uploads/")
def start_upload(name: str) -> tuple[str, int, dict[str, str]]:
    """202 + a session; ``?digest=``: monolithic upload (201); ``?mount=&from=``: 201 when the blob is stored
    (blobs are global, ``from`` only has to be a valid name), else a session (202) as the spec says."""
    validate_name(name)
    sv = services()
    mount = request.args.get("mount")
    if mount is not None:
        digest = _digest(mount, "mount")
        source = request.args.get("from")
        if source is not None:
            validate_name(source)
        sv.uploads.activity.touch()  # part of a push in progress (GC holds the blobs of one)
        if sv.blobs.keep(digest):
            return "", 201, _blob_headers(name, digest)
    elif request.args.get("digest") is not None:
        return _monolithic(name, _digest(request.args.get("digest")))
    session = sv.uploads.open(name)
    return "", 202, _session_headers(session)


def _range_error(session: UploadSession, message: str, hint: str | None = None) -> tuple[Response, int, dict]:
    """416 with the session's current ``Range``, so the client knows where to resume (errors raised as
    exceptions carry no headers)."""
    body, _ = v2_error(RangeInvalid(message, hint, detail={"uuid": session.id, "range": session.range}))
    return jsonify(body), 416, _session_headers(session)


def _append_body(session: UploadSession) -> tuple[Response, int, dict] | None:
    """Append the request body (if any) to the session; a 416 response when it is not the next chunk. A body
    over the size limit ends the session; a body cut short leaves it as it was (the client may resume)."""
    sv = services()
    content_range = request.headers.get("Content-Range")
    length = request.content_length
    if content_range is None and not length and not is_chunked():
        return None  # no body (a PUT that only closes the upload)
    expected: int | None = length
    if content_range is not None:
        m = CONTENT_RANGE_RE.match(content_range)
        if not m or int(m.group(2)) < int(m.group(1)):
            return _range_error(session, f"invalid Content-Range {content_range[:100]!r}",
                                "send Content-Range: <start>-<end> (inclusive byte offsets)")
        start, end = int(m.group(1)), int(m.group(2))
        if start != session.size:
            return _range_error(session, f"chunk starts at byte {start} but the upload holds {session.size} bytes",
                                f"send the next chunk from byte {session.size} (chunks must be in order)")
        expected = end - start + 1
        if length is not None and length != expected:
            raise SizeInvalid(f"Content-Length {length} does not match Content-Range {content_range[:100]!r}",
                              detail={"uuid": session.id})
    what = "upload"
    try:
        with _spec_body_errors():
            check_body_headers(what, already=session.size, allow_empty=True)
            sv.uploads.append(session, lambda up: receive(up, expected, what, allow_empty=True, finish=False))
    except TooLarge:
        sv.uploads.discard(session)  # it can never be completed
        raise
    return None


@bp.route("/<path:name>/blobs/uploads/<uuid>", methods=["PATCH"])
def patch_upload(name: str, uuid: str) -> Any:
    """One chunk (Content-Range + Content-Length), or the whole blob streamed (docker: chunked, no range)."""
    validate_name(name)
    with services().uploads.hold(name, uuid) as session:
        error = _append_body(session)
        if error is not None:
            return error
        return "", 202, _session_headers(session)


@bp.put("/<path:name>/blobs/uploads/<uuid>")
def finish_upload(name: str, uuid: str) -> Any:
    """Close the upload (with an optional last chunk): the digest of all its bytes must be ``?digest=``; then
    it is a stored blob (201). A mismatch ends the session and stores nothing."""
    validate_name(name)
    sv = services()
    with sv.uploads.hold(name, uuid) as session:
        digest = _digest(request.args.get("digest"))
        error = _append_body(session)
        if error is not None:
            return error
        up = sv.uploads.finish(session, digest.partition(":")[0])
        try:
            if up.digest != digest:
                raise DigestInvalid(f"the uploaded blob has digest {up.digest}, not {digest}",
                                    "the bytes changed in transit or the digest is wrong; nothing was stored, "
                                    "start the upload again", detail={"digest": digest, "computed": up.digest})
            sv.blobs.store_upload(up, KIND_BLOB)
        finally:
            up.discard()  # the file, unless the store committed it
    return "", 201, _blob_headers(name, digest)


@bp.get("/<path:name>/blobs/uploads/<uuid>")
def upload_status(name: str, uuid: str) -> tuple[str, int, dict[str, str]]:
    """204 with ``Range``: where to resume."""
    validate_name(name)
    session = services().uploads.get(name, uuid)
    return "", 204, _session_headers(session)


@bp.delete("/<path:name>/blobs/uploads/<uuid>")
def cancel_upload(name: str, uuid: str) -> tuple[str, int]:
    validate_name(name)
    sv = services()
    with sv.uploads.hold(name, uuid) as session:
        sv.uploads.discard(session)
    return "", 204
