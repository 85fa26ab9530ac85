"""V2 manifest routes: manifests by tag and digest, tags list, catalog, referrers. See docs/v2.md.

The logic lives in ``docket.registry.manifests`` (``RegistryServices.manifests``); these views parse the request
and write the spec's headers.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from flask import Response, current_app, jsonify, request
from werkzeug.exceptions import ClientDisconnected

from docket.errors import InvalidRequest
from docket.registry.db import get_session
from docket.registry.store import validate_digest
from docket.registry.v2 import bp, validate_name
from docket.registry.v2.errors import DigestInvalid, ManifestInvalid, V2Error

MAX_PAGE = 1000  # ``n`` above this is served as this many, with a Link to the rest


class PaginationInvalid(V2Error):
    """distribution's code for a bad ``n`` (the OCI spec has none of its own)."""

    status, code = 400, "PAGINATION_NUMBER_INVALID"


def _core() -> Any:
    return current_app.extensions["docket"].manifests


def _read_body() -> bytes:
    from docket.registry.manifests import MAX_MANIFEST_BYTES, ManifestTooLarge

    length = request.content_length
    if length is not None and length > MAX_MANIFEST_BYTES:
        raise ManifestTooLarge(f"manifest is {length} bytes; the limit is {MAX_MANIFEST_BYTES} (4 MiB)",
                               detail={"size": length, "limit": MAX_MANIFEST_BYTES})
    try:
        raw = request.stream.read(MAX_MANIFEST_BYTES + 1)
    except (ClientDisconnected, OSError) as exc:
        raise ManifestInvalid("the request body ended early", "send the manifest again") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestTooLarge(f"manifest exceeds the limit of {MAX_MANIFEST_BYTES} bytes (4 MiB)",
                               detail={"limit": MAX_MANIFEST_BYTES})
    if length is not None and len(raw) != length:
        raise ManifestInvalid(f"request body ended after {len(raw)} of {length} bytes", "send the manifest again")
    return raw


@bp.put("/<path:name>/manifests/<reference>")
def put_manifest(name: str, reference: str) -> tuple[str, int, dict[str, str]]:
    validate_name(name)
    raw = _read_body()
    parsed = _core().put(name, reference, raw, request.headers.get("Content-Type"))
    headers = {"Location": f"/v2/{name}/manifests/{parsed.digest}", "Docker-Content-Digest": parsed.digest}
    if parsed.subject is not None:
        headers["OCI-Subject"] = parsed.subject.digest
    return "", 201, headers


@bp.route("/<path:name>/manifests/<reference>", methods=["GET", "HEAD"])
def get_manifest(name: str, reference: str) -> Response:
    validate_name(name)
    body, row = _core().read(get_session(), name, reference)
    resp = Response(body, content_type=row.media_type)
    resp.headers["Docker-Content-Digest"] = row.digest
    resp.set_etag(row.digest)
    return resp


@bp.delete("/<path:name>/manifests/<reference>")
def delete_manifest(name: str, reference: str) -> tuple[str, int]:
    validate_name(name)
    _core().delete(name, reference)
    return "", 202


def _page(items: list[str], path: str) -> tuple[list[str], dict[str, str]]:
    """``n`` and ``last`` of the spec (sorted lists); a Link to the next page when one is left out."""
    raw_n, last = request.args.get("n"), request.args.get("last")
    if last is not None:
        items = [x for x in items if x > last]
    n = len(items)
    if raw_n is not None and raw_n != "":
        if not raw_n.isascii() or not raw_n.isdigit():
            raise PaginationInvalid(f"n must be a non-negative integer, not {raw_n[:50]!r}", detail={"n": raw_n[:50]})
        n = int(raw_n)
        if n == 0:
            return [], {}
    n = min(n, MAX_PAGE)
    page = items[:n]
    if len(items) <= n:
        return page, {}
    return page, {"Link": f'<{path}?n={n}&last={quote(page[-1], safe="")}>; rel="next"'}


@bp.get("/<path:name>/tags/list")
def tags_list(name: str) -> tuple[Response, int, dict[str, str]]:
    validate_name(name)
    tags, headers = _page(_core().tags(get_session(), name), f"/v2/{name}/tags/list")
    return jsonify({"name": name, "tags": tags}), 200, headers


@bp.get("/_catalog")
def catalog() -> tuple[Response, int, dict[str, str]]:
    repositories, headers = _page(_core().repositories(get_session()), "/v2/_catalog")
    return jsonify({"repositories": repositories}), 200, headers


@bp.get("/<path:name>/referrers/<digest>")
def referrers(name: str, digest: str) -> tuple[Response, int, dict[str, str]]:
    """Manifests of this repository whose subject is ``digest``: 200 even when there are none."""
    validate_name(name)
    try:
        validate_digest(digest)
    except InvalidRequest as exc:
        raise DigestInvalid(f"invalid digest {digest[:200]!r}", "sha256: and 64 lowercase hex digits, or sha512: "
                            "and 128", detail={"digest": digest[:200]}) from exc
    artifact_type = request.args.get("artifactType") or None
    manifests = _core().referrers(get_session(), name, digest, artifact_type)
    from docket.registry.manifests import OCI_INDEX

    body = jsonify({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    body.content_type = OCI_INDEX
    headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type is not None else {}
    return body, 200, headers
