"""Errors at the HTTP edge: components raise ``docket.errors`` types; this module turns them into the body of the
API a request is for, one table each: ``v1_error`` (``{"error": {"code", "message", "hint"}}``) and ``v2_error``
(the spec's ``{"errors": [{"code", "message", "detail"}]}``)."""

from __future__ import annotations

from typing import Any

from docket.errors import DistributionError, DocketError, ManifestBlobUnknown, WrongBlobKind

# /api/v1 codes of errors that are no DocketError, by HTTP status
HTTP_CODES = {400: "INVALID_REQUEST", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED", 408: "REQUEST_TIMEOUT",
              411: "LENGTH_REQUIRED", 413: "TOO_LARGE", 414: "URI_TOO_LONG", 415: "UNSUPPORTED_MEDIA_TYPE",
              416: "RANGE_NOT_SATISFIABLE", 431: "HEADERS_TOO_LARGE", 500: "INTERNAL", 501: "NOT_IMPLEMENTED",
              505: "HTTP_VERSION_NOT_SUPPORTED"}

# our own codes -> the spec's, for DocketErrors that are no DistributionError (a size limit, an unavailable seeder:
# others keep their code, which clients show as is)
SPEC_CODES = {"UNAUTHORIZED": "UNAUTHORIZED", "FORBIDDEN": "DENIED", "NOT_FOUND": "NAME_UNKNOWN",
              "DIGEST_MISMATCH": "DIGEST_INVALID", "TOO_LARGE": "SIZE_INVALID", "INVALID_REFERENCE": "NAME_INVALID"}
# errors that are no DocketError (werkzeug's own, the request-shape checks, an unexpected exception), by HTTP
# status: the spec's code where one fits, distribution's UNKNOWN for server errors, else UNSUPPORTED
V2_STATUS_CODES = {400: "UNSUPPORTED", 401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 405: "UNSUPPORTED",
                   411: "SIZE_INVALID", 413: "SIZE_INVALID", 416: "BLOB_UPLOAD_INVALID", 429: "TOOMANYREQUESTS",
                   431: "UNSUPPORTED"}


def is_v2(path: str | bytes) -> bool:
    if isinstance(path, bytes):
        path = path.decode("latin-1")
    return path == "/v2" or path.startswith("/v2/")


def error_body(code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    """The /api/v1 error shape: ``{"error": {"code", "message", "hint"}}``."""
    return {"error": {"code": code, "message": message, "hint": hint}}


def v1_error(exc: DocketError) -> tuple[dict[str, Any], int]:
    """(body, status) of a DocketError under /api/v1: its own code and status, except the push errors whose hint
    names an /api/v1 route."""
    if isinstance(exc, ManifestBlobUnknown):
        digest = (exc.detail or {}).get("digest")
        return error_body("NOT_FOUND", exc.message,
                          f"upload it first with POST /api/v1/blobs?kind={exc.what}&digest={digest}"), 404
    if isinstance(exc, WrongBlobKind):
        digest = (exc.detail or {}).get("digest")
        return error_body(exc.code, exc.message, f"upload it with POST /api/v1/blobs?kind=layer&digest={digest}"), 400
    return error_body(exc.code, exc.message, exc.hint), exc.status


def v2_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    return {"errors": [{"code": code, "message": message, "detail": detail}]}


def v2_error(exc: DocketError) -> tuple[dict[str, Any], int]:
    """(body, status) of a DocketError under /v2."""
    code = exc.code if isinstance(exc, DistributionError) else SPEC_CODES.get(exc.code, exc.code)
    message = exc.message if not exc.hint else f"{exc.message} (hint: {exc.hint})"
    return v2_body(code, message, exc.detail), exc.status


def api_error(path: str, exc: DocketError) -> tuple[dict[str, Any], int]:
    return v2_error(exc) if is_v2(path) else v1_error(exc)


def status_error(path: str | bytes, status: int, message: str, hint: str | None = None, *, code: str | None = None,
                 v2_code: str | None = None) -> dict[str, Any]:
    """The body of an error that is no DocketError (werkzeug's own, the request-shape checks, the server's
    timeouts): ``code``/``v2_code`` or the one each API has for ``status``."""
    if is_v2(path):
        v2_code = v2_code or V2_STATUS_CODES.get(status, "UNKNOWN" if status >= 500 else "UNSUPPORTED")
        return v2_body(v2_code, message if not hint else f"{message} (hint: {hint})")
    return error_body(code or HTTP_CODES.get(status, f"HTTP_{status}"), message, hint)
