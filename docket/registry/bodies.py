"""Receiving request bodies into uploads, shared by /api/v1 and /v2: announced length or chunked, the registry's
``--max-upload-size``, truncated bodies. Raises DocketErrors; each API renders them in its own error format."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, request, send_file
from werkzeug.exceptions import ClientDisconnected

from docket.errors import DocketError, InvalidRequest, TooLarge


class LengthRequired(DocketError):
    status, code, exit_code = 411, "LENGTH_REQUIRED", 2


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _config() -> Any:
    return current_app.extensions["docket"].config


def is_chunked() -> bool:
    return "chunked" in request.headers.get("Transfer-Encoding", "").lower()


def check_body_headers(what: str, *, already: int = 0, allow_empty: bool = False) -> int | None:
    """Content-Length or chunked, not over ``--max-upload-size`` (counting ``already`` bytes received earlier, for
    an upload made of several requests), not empty unless ``allow_empty``; returns the announced length."""
    limit = _config().max_upload_size
    length = request.content_length
    if length is None and not is_chunked():
        raise LengthRequired("Content-Length is required", "send Content-Length or use chunked transfer encoding")
    if length is not None and already + length > limit:
        size = human(length) if not already else f"{human(already + length)} with this part"
        raise TooLarge(f"{what} is {size}; this registry accepts up to {human(limit)}",
                       "ask the operator to raise --max-upload-size")
    if length == 0 and not allow_empty:
        raise InvalidRequest("empty request body", f"the body must be the {what}")
    return length


def receive(up: Any, length: int | None, what: str, *, allow_empty: bool = False, finish: bool = True) -> None:
    """Stream the request body into ``up`` (hashed while written), enforcing the announced length and the limit on
    ``up.size`` (which counts what ``up`` held before). ``finish``: fsync and close ``up`` at the end."""
    config = _config()
    limit = config.max_upload_size
    stream = request.stream
    chunk_size = config.chunk_size
    start = up.size
    while True:
        try:
            chunk = stream.read(chunk_size)
        except (ClientDisconnected, OSError) as exc:
            raise InvalidRequest(
                f"request body ended after {up.size - start} of {length if length is not None else '?'} bytes",
                "the client disconnected or timed out; push again",
            ) from exc
        if not chunk:
            break
        up.write(chunk)
        if up.size > limit:
            raise TooLarge(f"{what} exceeds {human(limit)}", "ask the operator to raise --max-upload-size")
    received = up.size - start
    if length is not None and received != length:
        raise InvalidRequest(f"request body ended after {received} of {length} bytes",
                             "the client disconnected; push again")
    if received == 0 and not allow_empty:
        raise InvalidRequest("empty request body", f"the body must be the {what}")
    if finish:
        up.finish()


BLOB_MAX_AGE = 365 * 24 * 3600  # blobs are immutable: cache them forever


class _ReleaseOnClose:
    """A response body that runs ``on_close`` exactly once when the server closes it (sent or aborted)."""

    def __init__(self, inner: Any, on_close: Any) -> None:
        self._inner = inner
        self._on_close = on_close

    def __iter__(self) -> Any:
        return iter(self._inner)

    def close(self) -> None:
        try:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()
        finally:
            on_close, self._on_close = self._on_close, None
            if on_close is not None:
                on_close()


def send_blob(sv: Any, digest: str, digest_header: str, download_name: str | None = None) -> Response:
    """A stored blob as the answer (GET or HEAD; Range, If-None-Match by send_file), held against GC while it is
    being sent. A HEAD renews an unreferenced blob's grace period: the client skips uploading what exists."""
    from docket.registry.blobops import keep_for_existence_check

    if request.method == "HEAD":
        keep_for_existence_check(sv, digest)
    sv.downloads.acquire(digest)  # GC waits for in-flight downloads
    try:
        resp = send_file(sv.store.blob_path(digest), mimetype="application/octet-stream", conditional=True,
                         etag=digest, max_age=BLOB_MAX_AGE, download_name=download_name)
    except BaseException:
        sv.downloads.release(digest)
        raise
    # werkzeug hands a direct-passthrough body to the server as is (call_on_close would never run): wrap it
    resp.response = _ReleaseOnClose(resp.response, lambda: sv.downloads.release(digest))
    resp.headers[digest_header] = digest
    resp.cache_control.immutable = True
    return resp
