"""docket-registry: the Flask application factory.

``create_app(config)`` builds the app and its services (blob store, database migrated to head, tracker and
seeder objects) without starting any process; the serve command (``cli.py``) starts tracker, seeders and GC.
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
from docket.registry.config import RegistryConfig

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "INVALID_REQUEST",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    408: "REQUEST_TIMEOUT",
    411: "LENGTH_REQUIRED",
    413: "TOO_LARGE",
    414: "URI_TOO_LONG",
    415: "UNSUPPORTED_MEDIA_TYPE",
    416: "RANGE_NOT_SATISFIABLE",
    431: "HEADERS_TOO_LARGE",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    505: "HTTP_VERSION_NOT_SUPPORTED",
}


def error_body(code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "hint": hint}}


def _error(status: int, code: str, message: str, hint: str | None = None,
           v2_code: str | None = None) -> tuple[Response, int]:
    """An error raised outside any view, in the body of the API the request is for: under /v2 always the spec's
    ``{"errors": [...]}`` with ``v2_code`` or a spec code for ``status`` (docket/registry/v2/errors.py), else
    /api/v1's."""
    if _is_v2():
        from docket.registry.v2.errors import v2_body, v2_status_code

        message = message if not hint else f"{message} (hint: {hint})"
        return jsonify(v2_body(v2_code or v2_status_code(status), message)), status
    return jsonify(error_body(code, message, hint)), status


def _is_v2() -> bool:
    return request.path == "/v2" or request.path.startswith("/v2/")


def _docket_error(exc: DocketError) -> tuple[Response, int]:
    if exc.status >= 500:
        log.error("%s: %s", exc.code, exc.message)
    if _is_v2():
        from docket.registry.v2.errors import v2_error_body

        return jsonify(v2_error_body(exc)), exc.status
    return jsonify(error_body(exc.code, exc.message, exc.hint)), exc.status


def _http_error(exc: HTTPException) -> Response:
    """Werkzeug's own errors (404, 405, 416 ...) as JSON, keeping their headers (Allow, Content-Range)."""
    resp = exc.get_response()
    status = exc.code or 500
    code = _HTTP_CODES.get(status, f"HTTP_{status}")
    if _is_v2():  # a route that does not exist, a method not allowed, werkzeug's 413/431 ...
        from docket.registry.v2.errors import v2_body, v2_status_code

        body = v2_body(v2_status_code(status), exc.description or exc.name)
    else:
        body = error_body(code, exc.description or exc.name)
    resp.set_data(jsonify(body).get_data())
    resp.mimetype = "application/json"
    return resp


def _unexpected(exc: Exception) -> tuple[Response, int]:
    from docket.registry.storage import storage_error

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

    from docket.registry import api, db, health, v2
    from docket.registry.auth import TokenAuth
    from docket.registry.services import RegistryServices

    app = Flask(__name__)
    # no redirects: werkzeug would answer `repositories//app` with an HTML 308 to `repositories/app` (a PUT that
    # follows it pushes under another name); a bad name is a 400 here, never a silent rewrite
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.config.update(JSON_SORT_KEYS=False, MAX_CONTENT_LENGTH=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    services = RegistryServices(config)
    services.prepare()
    app.extensions["docket"] = services
    db.init_app(app)
    app.before_request(_check_request_shape(config.max_header_bytes))
    TokenAuth(config.auth_tokens, config.read_tokens).init_app(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(v2.bp)
    app.register_error_handler(DocketError, _docket_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    return app


__all__ = ["RegistryConfig", "create_app"]
