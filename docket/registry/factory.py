"""docket-registry: the Flask application factory (``docket.registry.create_app`` loads it on first use).

``create_app(config)`` builds every component (``components.build``: blob store, database migrated to head,
tracker and seeder objects) without starting any process and keeps them in ``app.extensions["docket"]``; the
serve command (``cli.py``) starts tracker, seeders and GC.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote_to_bytes

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from docket.errors import DocketError
from docket.registry import api, db, health, hosts, v2, web
from docket.registry.auth import TokenAuth
from docket.registry.components import build
from docket.registry.config import RegistryConfig
from docket.registry.edges import api_error, status_error
from docket.registry.metrics import RegistryMetrics
from docket.registry.storage import storage_error
from docket.registry.v2 import blobs, manifests  # noqa: F401 - importing them registers their routes on v2.bp

log = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, hint: str | None = None,
           v2_code: str | None = None) -> tuple[Response, int]:
    """An error raised outside any view, in the body of the API the request is for."""
    return jsonify(status_error(request.path, status, message, hint, code=code, v2_code=v2_code)), status


def _docket_error(exc: DocketError) -> tuple[Response, int]:
    if exc.status >= 500:
        log.error("%s: %s", exc.code, exc.message)
    body, status = api_error(request.path, exc)
    return jsonify(body), status


def _http_error(exc: HTTPException) -> Response:
    """Werkzeug's own errors (404, 405, 416 ...) as JSON, keeping their headers (Allow, Content-Range)."""
    resp = exc.get_response()
    body = status_error(request.path, exc.code or 500, exc.description or exc.name)
    resp.set_data(jsonify(body).get_data())
    resp.mimetype = "application/json"
    return resp


def _unexpected(exc: Exception) -> tuple[Response, int]:
    translated = storage_error(exc)  # a full disk (507), a read-only or failing volume or database (503)
    if translated is not None:
        log.error("storage failure in %s %s: %s", request.method, request.path,
                  str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return _docket_error(translated)
    log.exception("unhandled error")
    return _error(500, "INTERNAL", "internal error in the registry", "see the registry log")


_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _control_in_path(path: str, pos: int) -> tuple[Response, int]:
    """400 for a control character in the path, with the code of what that segment is (a digest, a tag, a name)."""
    parts = path[:pos].split("/")
    before = parts[-2] if len(parts) > 1 else ""
    digest = before in ("blobs", "referrers") or (before == "manifests" and ":" in path[pos - len(parts[-1]):])
    v1_code, v2_code = ("INVALID_REQUEST", "DIGEST_INVALID") if digest else \
        ("INVALID_REFERENCE", "MANIFEST_INVALID" if before == "manifests" else "NAME_INVALID")
    return _error(400, v1_code, f"the path holds a control character: {path[:200]!r}",
                  "names, tags and digests never hold control characters (newline, tab, NUL ...)", v2_code=v2_code)


def _check_request_shape(limit: int):
    """Refuse, before any view runs, headers over ``limit`` bytes (431: cheroot itself only has a 413, at its
    larger cap), malformed query strings (400: no endpoint takes one, so it is a client bug), and control
    characters in the path (400: no name, tag or digest holds one; routing would answer 404 for some, and "v1\n"
    once became a tag)."""
    def check() -> tuple[Response, int] | None:
        control = _CONTROL.search(request.path)
        if control:
            return _control_in_path(request.path, control.start())
        size = sum(len(k) + len(v) + 4 for k, v in request.headers.items())
        if size > limit:
            return _error(431, "HEADERS_TOO_LARGE", f"request headers are {size} bytes; the limit is {limit}",
                          "send fewer or shorter headers (cookies?)")
        query = request.query_string
        if query:
            try:
                unquote_to_bytes(query).decode("utf-8")
                malformed = bool(_BAD_PERCENT.search(query))
            except UnicodeDecodeError:
                malformed = True
            if malformed:
                return _error(400, "INVALID_REQUEST", "malformed query string (bad percent-encoding or not UTF-8)",
                              "percent-encode query parameters as UTF-8")
        return None
    return check


def create_app(config: RegistryConfig | Mapping[str, Any] | None = None) -> Flask:
    """Build the app; ``config`` is a RegistryConfig or a mapping of overrides of the defaults."""
    if config is None:
        config = RegistryConfig()
    elif not isinstance(config, RegistryConfig):
        config = RegistryConfig().with_overrides(**dict(config))

    app = Flask(__name__)
    # no redirects: werkzeug would answer `repositories//app` with an HTML 308 to `repositories/app` (a PUT that
    # follows it pushes under another name); a bad name is a 400 here, never a silent rewrite
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.config.update(JSON_SORT_KEYS=False, MAX_CONTENT_LENGTH=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["docket"] = build(config)
    db.init_app(app)
    app.before_request(_check_request_shape(config.max_header_bytes))
    TokenAuth(config.auth_tokens, config.read_tokens).init_app(app)
    RegistryMetrics(app.extensions["docket"]).init_app(app)  # GET /metrics; counts every request from here on
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(v2.bp)
    hosts.init_app(app)
    web.init_app(app)
    app.register_error_handler(DocketError, _docket_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    return app


__all__ = ["RegistryConfig", "create_app"]
