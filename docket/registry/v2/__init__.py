"""The Docker Registry HTTP API V2 / OCI distribution API on the same store as /api/v1 (docs/v2.md).

``bp`` carries every /v2 route; ``blobs`` and ``manifests`` register theirs on it (the application factory imports
both). Stock clients (docker, skopeo, oras) push and pull here; layers of every image manifest also get torrents
and seeders, so ``docket pull`` gets the same images over BitTorrent.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Response, current_app, jsonify

from docket.errors import NameInvalid

bp = Blueprint("v2", __name__, url_prefix="/v2")

API_VERSION_HEADER = ("Docker-Distribution-API-Version", "registry/2.0")
# the spec's <name>: path components of lowercase alphanumerics and separators, no host part
NAME_RE = re.compile(r"\A[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*\Z")
MAX_NAME = 255


def validate_name(name: str) -> str:
    if len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name[:300]!r}",
                          "lowercase letters, digits and separators (. _ __ -), components joined by /",
                          detail={"name": name[:300]})
    return name


@bp.after_request
def _version_header(resp: Response) -> Response:
    resp.headers.setdefault(*API_VERSION_HEADER)
    return resp


@bp.get("/")
def version_check() -> Response:
    """The spec's end-1: 200 means this registry implements V2 (and the caller's credentials, if any, are good)."""
    return jsonify({})


@bp.get("/token")
def token() -> Any:
    """The token endpoint the 401 challenge names (docker's token-auth flow): see ``TokenAuth.issue``."""
    return current_app.extensions["docket_auth"].issue()
