"""docket-registry: the Flask application factory.

``create_app(config)`` builds the app and its services (blob store, database migrated to head, tracker and
seeder objects) without starting any process; the serve command (``cli.py``) starts tracker, seeders and GC.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, jsonify
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
}


def error_body(code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "hint": hint}}


def _docket_error(exc: DocketError) -> tuple[Response, int]:
    if exc.status >= 500:
        log.error("%s: %s", exc.code, exc.message)
    return jsonify(error_body(exc.code, exc.message, exc.hint)), exc.status


def _http_error(exc: HTTPException) -> Response:
    """Werkzeug's own errors (404, 405, 416 ...) as JSON, keeping their headers (Allow, Content-Range)."""
    resp = exc.get_response()
    status = exc.code or 500
    code = _HTTP_CODES.get(status, f"HTTP_{status}")
    resp.set_data(jsonify(error_body(code, exc.description or exc.name)).get_data())
    resp.mimetype = "application/json"
    return resp


def _unexpected(exc: Exception) -> tuple[Response, int]:
    log.exception("unhandled error")
    return jsonify(error_body("INTERNAL", "internal error in the registry", "see the registry log")), 500


def create_app(config: RegistryConfig | Mapping[str, Any] | None = None) -> Flask:
    """Build the app; ``config`` is a RegistryConfig or a mapping of overrides of the defaults."""
    if config is None:
        config = RegistryConfig()
    elif not isinstance(config, RegistryConfig):
        config = RegistryConfig().with_overrides(**dict(config))

    from docket.registry import api, db, health
    from docket.registry.services import RegistryServices

    app = Flask(__name__)
    app.config.update(JSON_SORT_KEYS=False, MAX_CONTENT_LENGTH=None)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    services = RegistryServices(config)
    services.prepare()
    app.extensions["docket"] = services
    db.init_app(app)
    app.register_blueprint(api.bp)
    app.register_blueprint(health.bp)
    app.register_error_handler(DocketError, _docket_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _unexpected)
    return app


__all__ = ["RegistryConfig", "create_app"]
