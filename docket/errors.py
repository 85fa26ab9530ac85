"""One error hierarchy for the whole project.

Library code raises these; only the edges translate them: the registry's HTTP layer into JSON error
bodies with a status code, the CLI into a message plus a non-zero exit code.
"""

from __future__ import annotations

from typing import Any


class DocketError(Exception):
    """Base class. ``message`` says what failed, ``hint`` says what to do about it."""

    status = 500  # HTTP status when this reaches the registry's edge
    code = "INTERNAL"  # stable machine-readable code in JSON error bodies
    exit_code = 1  # CLI exit status

    def __init__(self, message: str, hint: str | None = None, detail: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.detail = detail  # machine-readable facts for error bodies (the /v2 ``detail``)

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class InvalidReference(DocketError):
    status, code, exit_code = 400, "INVALID_REFERENCE", 2


class InvalidRequest(DocketError):
    status, code, exit_code = 400, "INVALID_REQUEST", 2


class InvalidJSON(InvalidRequest):
    """A JSON document from the network that docket will not hold: not strict UTF-8 JSON, ambiguous (duplicate
    keys), non-standard (NaN), too deep, too big, or numbers out of range (docket/jsonstrict.py)."""


class InvalidImage(DocketError):
    """An uploaded or downloaded tarball is not a usable ``docker save`` archive."""

    status, code, exit_code = 400, "INVALID_IMAGE", 3


class TooLarge(DocketError):
    status, code, exit_code = 413, "TOO_LARGE", 3


class NotFound(DocketError):
    status, code, exit_code = 404, "NOT_FOUND", 4


class Unauthorized(DocketError):
    status, code, exit_code = 401, "UNAUTHORIZED", 5


class Forbidden(Unauthorized):
    """A valid token that does not allow this request (a read-only token used to push)."""

    status, code, exit_code = 403, "FORBIDDEN", 5


class IntegrityError(DocketError):
    """Bytes did not match the digest or info hash they were promised to have."""

    status, code, exit_code = 400, "DIGEST_MISMATCH", 6


class ToolMissing(DocketError):
    """An external program (ctorrent, opentracker, dockerd) is not installed."""

    status, code, exit_code = 503, "TOOL_MISSING", 7


class ServiceUnavailable(DocketError):
    """Something we depend on (registry, tracker, docker daemon, seeder) is down."""

    status, code, exit_code = 503, "UNAVAILABLE", 8


class TransferError(DocketError):
    """A BitTorrent or HTTP transfer failed or made no progress."""

    status, code, exit_code = 502, "TRANSFER_FAILED", 9


class NoSpace(DocketError):
    """Not enough free disk space for what an operation must write."""

    status, code, exit_code = 507, "INSUFFICIENT_STORAGE", 10


# -- registry domain errors whose code is the OCI distribution spec's (docs/v2.md); /api/v1 and /v2 map them to
# their bodies in one table each (docket/registry/edges.py)
class DistributionError(DocketError):
    exit_code = 2


class BlobUnknown(DistributionError):
    status, code = 404, "BLOB_UNKNOWN"


class BlobUploadInvalid(DistributionError):
    status, code = 400, "BLOB_UPLOAD_INVALID"


class BlobUploadUnknown(DistributionError):
    status, code = 404, "BLOB_UPLOAD_UNKNOWN"


class DigestInvalid(DistributionError):
    status, code = 400, "DIGEST_INVALID"


class ManifestBlobUnknown(DistributionError):
    """A manifest names a blob the store does not hold; ``what`` is "config" or "layer"."""

    status, code = 404, "MANIFEST_BLOB_UNKNOWN"

    def __init__(self, message: str, hint: str | None = None, detail: Any = None, what: str = "layer") -> None:
        super().__init__(message, hint, detail)
        self.what = what


class WrongBlobKind(InvalidRequest):
    """A docket push lists as a layer a blob uploaded as another kind (a config)."""


class ManifestInvalid(DistributionError):
    status, code = 400, "MANIFEST_INVALID"


class ManifestTooLarge(DistributionError):
    """The spec: registries SHOULD answer 413 to a manifest over their limit (at least 4 MiB must be accepted)."""

    status, code = 413, "MANIFEST_INVALID"


class ManifestUnknown(DistributionError):
    status, code = 404, "MANIFEST_UNKNOWN"


class NameInvalid(DistributionError):
    status, code = 400, "NAME_INVALID"


class NameUnknown(DistributionError):
    status, code = 404, "NAME_UNKNOWN"


class SizeInvalid(DistributionError):
    status, code = 400, "SIZE_INVALID"


class RangeInvalid(DistributionError):
    """A chunk that does not start where the upload ends (out of order) or a bad Content-Range: 416."""

    status, code = 416, "BLOB_UPLOAD_INVALID"


class Unsupported(DistributionError):
    status, code = 415, "UNSUPPORTED"


class DeleteRefused(DistributionError):
    """A DELETE this registry does not do while something references the target (a blob a manifest lists, a
    manifest an index lists): 405, one of the codes the spec allows for both DELETE routes (202/404/400/405)."""

    status, code = 405, "UNSUPPORTED"


class TooManyUploads(DistributionError):
    status, code = 429, "TOOMANYREQUESTS"
