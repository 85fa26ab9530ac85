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
    411: "LENGTH_REQUIRED",
    413: "TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    416: "RANGE_NOT_SATISFIABLE",
    431: "HEADERS_TOO_LARGE",
}


# werkzeug's own errors under /v2 (a route that does not exist, a method not allowed) in the spec's codes
_V2_HTTP_CODES = {404: "NAME_UNKNOWN", 405: "UNSUPPORTED", 416: "BLOB_UPLOAD_INVALID", 401: "UNAUTHORIZED"}


def error_body(code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "hint": hint}}


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
    if _is_v2():
        code = _V2_HTTP_CODES.get(status, code)
        body = {"errors": [{"code": code, "message": exc.description or exc.name, "detail": None}]}
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
    return jsonify(error_body("INTERNAL", "internal error in the registry", "see the registry log")), 500


_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _check_request_shape(limit: int):
    """Refuse, before any view runs, headers over ``limit`` bytes (431 as JSON: cheroot only has a plain-text
    413 at its larger cap) and malformed query strings (400: no endpoint takes one, so it is a client bug)."""
    def check() -> tuple[Response, int] | None:
        size = sum(len(k) + len(v) + 4 for k, v in request.headers.items())
        if size > limit:
            return jsonify(error_body("HEADERS_TOO_LARGE", f"request headers are {size} bytes; the limit is {limit}",
                                      "send fewer or shorter headers (cookies?)")), 431
        query = request.query_string
        if query:
            try:
                unquote_to_bytes(query).decode("utf-8")
                malformed = bool(_BAD_PERCENT.search(query))
            except UnicodeDecodeError:
                malformed = True
            if malformed:
                return jsonify(error_body("INVALID_REQUEST", "malformed query string (bad percent-encoding or not "
                                          "UTF-8)", "percent-encode query parameters as UTF-8")), 400
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
