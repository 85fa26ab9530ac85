"""The OCI distribution spec's error codes, as DocketErrors (so the one error hierarchy still holds).

Under ``/v2`` every error body is the spec's ``{"errors": [{"code", "message", "detail"}]}``; a DocketError raised
by shared code (a size limit, an unavailable seeder) keeps its own code there, which clients show as is.
"""

from __future__ import annotations

from typing import Any

from docket.errors import DocketError

# our own codes -> the spec's, for shared code raising plain DocketErrors under /v2
SPEC_CODES = {"UNAUTHORIZED": "UNAUTHORIZED", "FORBIDDEN": "DENIED", "NOT_FOUND": "NAME_UNKNOWN",
              "DIGEST_MISMATCH": "DIGEST_INVALID", "TOO_LARGE": "SIZE_INVALID", "INVALID_REFERENCE": "NAME_INVALID"}


class V2Error(DocketError):
    exit_code = 2

    def __init__(self, message: str, hint: str | None = None, detail: Any = None) -> None:
        super().__init__(message, hint)
        self.detail = detail


class BlobUnknown(V2Error):
    status, code = 404, "BLOB_UNKNOWN"


class BlobUploadInvalid(V2Error):
    status, code = 400, "BLOB_UPLOAD_INVALID"


class BlobUploadUnknown(V2Error):
    status, code = 404, "BLOB_UPLOAD_UNKNOWN"


class DigestInvalid(V2Error):
    status, code = 400, "DIGEST_INVALID"


class ManifestBlobUnknown(V2Error):
    status, code = 404, "MANIFEST_BLOB_UNKNOWN"


class ManifestInvalid(V2Error):
    status, code = 400, "MANIFEST_INVALID"


class ManifestUnknown(V2Error):
    status, code = 404, "MANIFEST_UNKNOWN"


class NameInvalid(V2Error):
    status, code = 400, "NAME_INVALID"


class NameUnknown(V2Error):
    status, code = 404, "NAME_UNKNOWN"


class SizeInvalid(V2Error):
    status, code = 400, "SIZE_INVALID"


class RangeInvalid(V2Error):
    """A chunk that does not start where the upload ends (out of order) or a bad Content-Range: 416."""

    status, code = 416, "BLOB_UPLOAD_INVALID"


class Unsupported(V2Error):
    status, code = 415, "UNSUPPORTED"


class Denied(V2Error):
    status, code = 403, "DENIED"


class InUse(V2Error):
    """Deleting a blob that a manifest still references."""

    status, code = 409, "DENIED"


class DeleteRefused(V2Error):
    """A DELETE this registry does not do while something references the target (a blob a manifest lists, a
    manifest an index lists): 405, one of the codes the spec allows for both DELETE routes (202/404/400/405)."""

    status, code = 405, "UNSUPPORTED"


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


def v2_error_body(exc: DocketError) -> dict[str, Any]:
    code = exc.code if isinstance(exc, V2Error) else SPEC_CODES.get(exc.code, exc.code)
    message = exc.message if not exc.hint else f"{exc.message} (hint: {exc.hint})"
    return v2_body(code, message, getattr(exc, "detail", None))
