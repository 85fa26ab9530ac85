"""The one table of /v2 error bodies: the spec's ``{"errors": [{"code", "message", "detail"}]}``.

Components raise ``docket.errors`` types; ``DistributionError``s carry the spec's code, other DocketErrors (a size
limit, an unavailable seeder) are mapped here or keep their own code, which clients show as is.
"""

from __future__ import annotations

from typing import Any

from docket.errors import DistributionError, DocketError

# our own codes -> the spec's, for shared code raising plain DocketErrors under /v2
SPEC_CODES = {"UNAUTHORIZED": "UNAUTHORIZED", "FORBIDDEN": "DENIED", "NOT_FOUND": "NAME_UNKNOWN",
              "DIGEST_MISMATCH": "DIGEST_INVALID", "TOO_LARGE": "SIZE_INVALID", "INVALID_REFERENCE": "NAME_INVALID"}

# errors raised outside any view's DocketErrors (werkzeug's own, the request-shape checks, an unexpected exception),
# by HTTP status: the spec's code where one fits, distribution's UNKNOWN for server errors, else UNSUPPORTED
HTTP_STATUS_CODES = {400: "UNSUPPORTED", 401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN",
                     405: "UNSUPPORTED", 411: "SIZE_INVALID", 413: "SIZE_INVALID", 416: "BLOB_UPLOAD_INVALID",
                     429: "TOOMANYREQUESTS", 431: "UNSUPPORTED"}


def v2_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    """The one error shape under /v2: ``{"errors": [{"code", "message", "detail"}]}``."""
    return {"errors": [{"code": code, "message": message, "detail": detail}]}


def v2_status_code(status: int) -> str:
    return HTTP_STATUS_CODES.get(status, "UNKNOWN" if status >= 500 else "UNSUPPORTED")


def v2_error(exc: DocketError) -> tuple[dict[str, Any], int]:
    """(body, status) of any DocketError under /v2."""
    code = exc.code if isinstance(exc, DistributionError) else SPEC_CODES.get(exc.code, exc.code)
    message = exc.message if not exc.hint else f"{exc.message} (hint: {exc.hint})"
    return v2_body(code, message, exc.detail), exc.status


def v2_error_body(exc: DocketError) -> dict[str, Any]:
    return v2_error(exc)[0]
