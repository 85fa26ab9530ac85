"""V2 manifest routes: manifests by tag and digest, tags list, catalog, referrers. See docs/v2.md.

The logic lives in ``docket.registry.manifests`` (``Manifests``) and ``docket.registry.queries``; these views parse
the request and write the spec's headers and URLs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from flask import Response, current_app, jsonify, request
from werkzeug.datastructures import Headers
from werkzeug.exceptions import ClientDisconnected

from docket.errors import (
    DeleteRefused, DigestInvalid, DistributionError, InvalidRequest, ManifestInvalid, ManifestTooLarge,
)
from docket.reference import TAG_RE
from docket.registry.bodies import too_slow
from docket.registry.db import get_session
from docket.registry.manifests import Manifests
from docket.registry.oci import MAX_MANIFEST_BYTES, OCI_INDEX, parse_manifest, split_reference
from docket.registry.queries import ORIGIN_V2, referrers as find_referrers, repositories as all_repositories, tags as repository_tags
from docket.registry.store import validate_digest
from docket.registry.v2 import bp, validate_name
from docket.registry.edges import v2_error

MAX_PAGE = 1000  # ``n`` above this is served as this many, with a Link to the rest
MAX_TAG_PARAMS = 100  # ``?tag=`` values of one PUT (the draft asks for at least 10; more: 414)


class PaginationInvalid(DistributionError):
    """distribution's code for a bad ``n`` (the OCI spec has none of its own)."""

    status, code = 400, "PAGINATION_NUMBER_INVALID"


class TooManyTags(DistributionError):
    """The distribution-spec draft: a registry MAY answer 414 to more ``tag`` parameters than it accepts."""

    status, code = 414, "TAG_INVALID"


def _tag_params() -> tuple[str, ...]:
    """``?tag=a&tag=b`` (distribution-spec draft, end-7b): each a valid tag, at most MAX_TAG_PARAMS."""
    tags = tuple(request.args.getlist("tag"))
    if len(tags) > MAX_TAG_PARAMS:
        raise TooManyTags(f"{len(tags)} tag parameters; this registry accepts up to {MAX_TAG_PARAMS} in one PUT",
                          "push the rest with further PUTs", detail={"count": len(tags), "limit": MAX_TAG_PARAMS})
    for tag in tags:
        if not TAG_RE.fullmatch(tag):
            raise ManifestInvalid(f"invalid tag parameter {tag[:200]!r}",
                                  "a tag is 1-128 of A-Z a-z 0-9 _ . - and does not start with . or -",
                                  detail={"tag": tag[:200]})
    return tags


def _digest_param() -> str | None:
    """``?digest=`` on a push by tag (as regclient and olareg do): the digest, and so the algorithm, the manifest
    is stored under."""
    value = request.args.get("digest")
    if value is None:
        return None
    try:
        return validate_digest(value)
    except InvalidRequest as exc:
        raise DigestInvalid(f"invalid digest parameter {value[:200]!r}", "sha256: and 64 lowercase hex digits, or "
                            "sha512: and 128", detail={"digest": value[:200]}) from exc


def _core() -> Manifests:
    return current_app.extensions["docket"].manifests


def _read_body() -> bytes:
    length = request.content_length
    if length is not None and length > MAX_MANIFEST_BYTES:
        raise ManifestTooLarge(f"manifest is {length} bytes; the limit is {MAX_MANIFEST_BYTES} (4 MiB)",
                               detail={"size": length, "limit": MAX_MANIFEST_BYTES})
    try:
        raw = request.stream.read(MAX_MANIFEST_BYTES + 1)
    except (ClientDisconnected, OSError) as exc:
        raise too_slow(exc) or ManifestInvalid("the request body ended early", "send the manifest again") from exc
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestTooLarge(f"manifest exceeds the limit of {MAX_MANIFEST_BYTES} bytes (4 MiB)",
                               detail={"limit": MAX_MANIFEST_BYTES})
    if length is not None and len(raw) != length:
        raise ManifestInvalid(f"request body ended after {len(raw)} of {length} bytes", "send the manifest again")
    return raw


@bp.put("/<path:name>/manifests/<reference>")
def put_manifest(name: str, reference: str) -> tuple[str, int, Headers]:
    """201; ``?tag=`` (repeatable) tags it too, each confirmed by an ``OCI-Tag`` header; ``?digest=`` keeps the
    requested digest algorithm for a push by tag."""
    validate_name(name)
    tags, digest = _tag_params(), _digest_param()
    raw = _read_body()
    ref_tag, wanted = split_reference(reference)
    if digest is not None:
        if wanted is not None and digest != wanted:
            raise DigestInvalid(f"?digest={digest[:200]} differs from the digest {wanted} in the URL",
                                detail={"digest": digest[:200]})
        wanted = digest
    parsed = parse_manifest(raw, request.headers.get("Content-Type"), wanted.split(":", 1)[0] if wanted else "sha256")
    if wanted is not None and parsed.digest != wanted:
        raise DigestInvalid(f"the manifest's bytes hash to {parsed.digest}, not {wanted}",
                            "PUT the exact bytes whose digest is in the URL", detail={"digest": wanted})
    all_tags = tuple(dict.fromkeys(((ref_tag,) if ref_tag is not None else ()) + tags))
    _core().commit(name, all_tags, parsed, ORIGIN_V2)
    headers = Headers({"Location": f"/v2/{name}/manifests/{parsed.digest}", "Docker-Content-Digest": parsed.digest})
    if parsed.subject is not None:
        headers["OCI-Subject"] = parsed.subject.digest
    for tag in dict.fromkeys(tags):
        headers.add("OCI-Tag", tag)
    return "", 201, headers


@bp.route("/<path:name>/manifests/<reference>", methods=["GET", "HEAD"])
def get_manifest(name: str, reference: str) -> Response:
    validate_name(name)
    body, row = _core().read(get_session(), name, reference)
    resp = Response(body, content_type=row.media_type)
    resp.headers["Docker-Content-Digest"] = row.digest
    resp.set_etag(row.digest)
    return resp.make_conditional(request)  # If-None-Match: the digest -> 304


@bp.delete("/<path:name>/manifests/<reference>")
def delete_manifest(name: str, reference: str) -> Any:
    """202; 405 (a code the spec allows here) for a manifest an index of the repository lists."""
    validate_name(name)
    try:
        _core().delete(name, reference)
    except DeleteRefused as exc:
        return jsonify(v2_error(exc)[0]), exc.status, {"Allow": "GET, HEAD, PUT"}
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
        n = int(raw_n) if len(raw_n) <= 18 else MAX_PAGE  # 5,000 digits: int() raises ValueError (a 500)
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
    tags, headers = _page(repository_tags(get_session(), name), f"/v2/{name}/tags/list")
    return jsonify({"name": name, "tags": tags}), 200, headers


@bp.get("/_catalog")
def catalog() -> tuple[Response, int, dict[str, str]]:
    repositories, headers = _page(all_repositories(get_session()), "/v2/_catalog")
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
    manifests = find_referrers(get_session(), name, digest, artifact_type)
    body = jsonify({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
    body.content_type = OCI_INDEX
    headers = {"OCI-Filters-Applied": "artifactType"} if artifact_type is not None else {}
    return body, 200, headers
