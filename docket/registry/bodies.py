"""Receiving request bodies into uploads, shared by /api/v1 and /v2: announced length or chunked, the registry's
``--max-upload-size``, truncated bodies. Raises DocketErrors; each API renders them in its own error format."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from flask import Response, current_app, jsonify, request, send_file
from werkzeug.exceptions import ClientDisconnected, RequestedRangeNotSatisfiable

from docket.errors import DocketError, InvalidRequest, NotFound, TooLarge
from docket.registry.edges import api_error

log = logging.getLogger(__name__)


class LengthRequired(DocketError):
    status, code, exit_code = 411, "LENGTH_REQUIRED", 2


class RequestTimeout(DocketError):
    """A body that arrived slower than the server's deadlines (docket/registry/server.py): nothing is stored."""

    status, code, exit_code = 408, "REQUEST_TIMEOUT", 8


def too_slow(exc: BaseException) -> RequestTimeout | None:
    """A RequestTimeout when a read of the body failed by a deadline (werkzeug wraps it in ClientDisconnected)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, TimeoutError):
            return RequestTimeout(f"the request body arrived too slowly: {seen}",
                                  "send it again over a faster link, or ask the operator about --body-min-rate")
        seen = seen.__cause__ or seen.__context__
    return None


def read_small(limit: int, what: str) -> bytes:
    """A whole small body (a manifest, a heartbeat, an admin request) of at most ``limit`` bytes: TooLarge when its
    length says more or it brings more, RequestTimeout when it is too slow, InvalidRequest when it ends early."""
    length = request.content_length
    if length is not None and length > limit:
        raise TooLarge(f"the {what} is {human(length)}; the limit is {human(limit)}")
    try:
        raw = request.stream.read(limit + 1)
    except (ClientDisconnected, OSError) as exc:
        raise too_slow(exc) or InvalidRequest("the request body ended early", f"send the {what} again") from exc
    if len(raw) > limit:
        raise TooLarge(f"the {what} exceeds {human(limit)}")
    return raw


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
    current_app.extensions["docket"].blobs.require_space(length or 0)  # 507 before any byte is written
    return length


def receive(up: Any, length: int | None, what: str, *, allow_empty: bool = False, finish: bool = True) -> None:
    """Stream the request body into ``up`` (hashed while written), enforcing the announced length and the limit on
    ``up.size`` (which counts what ``up`` held before). ``finish``: fsync and close ``up`` at the end."""
    config = _config()
    with current_app.extensions["docket"].uploads.activity.active():  # a push in progress: GC holds its blobs
        received = _receive(up, length, what, config.max_upload_size, config.chunk_size, allow_empty)
    metrics = current_app.extensions.get("docket_metrics")
    if metrics is not None:
        metrics.received(received)  # push bytes (docket/registry/metrics.py)
    if finish:
        up.finish()


def _receive(up: Any, length: int | None, what: str, limit: int, chunk_size: int, allow_empty: bool) -> int:
    stream = request.stream
    start = up.size
    while True:
        try:
            chunk = stream.read(chunk_size)
        except (ClientDisconnected, OSError) as exc:
            raise too_slow(exc) or InvalidRequest(
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
    return received


BLOB_MAX_AGE = 365 * 24 * 3600  # blobs are immutable: cache them forever
# one RFC 9110 byte-range-spec: "first-last", "first-" or "-suffix" (digits only, whole string)
_RANGE_SPEC = re.compile(r"\A(?:(\d{1,19})-(\d{0,19})|-(\d{1,19}))\Z")


class RangeNotSatisfiable(DocketError):
    """A download's Range that does not overlap the blob (416). Not an upload code: the spec has none for
    downloads (distribution answers them in plain text), so both APIs use this one."""

    status, code, exit_code = 416, "RANGE_NOT_SATISFIABLE", 2


def _ignore_range(size: int) -> bool:
    """RFC 9110 14.2: a Range in a unit other than bytes MUST be ignored, and an invalid one MAY be; several
    ranges of which one overlaps the blob are served as the whole blob (200, which the RFC allows, rather than
    multipart/byteranges). True when the Range header is to be ignored; single ranges are left to werkzeug
    (206 or 416)."""
    value = request.headers.get("Range")
    if value is None:
        return False
    unit, eq, specs = value.partition("=")
    if not eq or unit.strip(" \t").lower() != "bytes":
        return True
    parsed = []
    for item in specs.split(","):
        m = _RANGE_SPEC.match(item.strip(" \t"))
        if m is None:
            return True  # not a byte-range-spec: an invalid Range, ignored
        first, last, suffix = m.groups()
        if first is not None and last and int(last) < int(first):
            return True  # last before first: invalid (RFC 9110 14.1.1), ignored
        parsed.append((first, suffix))
    if len(parsed) == 1:
        return False
    return any((first is not None and int(first) < size) or (suffix is not None and int(suffix) > 0)
               for first, suffix in parsed)


def _range_not_satisfiable(size: int) -> Response:
    """416 with ``Content-Range: bytes */<size>`` (RFC 9110), in the error shape of the API asked."""
    exc = RangeNotSatisfiable(f"no requested range overlaps the {size} bytes here",
                              "ask for bytes=<first>-<last> with first below the size")
    if request.path.startswith("/v2/"):
        exc.detail = {"size": size, "range": request.headers.get("Range", "")[:200]}
    body, _ = api_error(request.path, exc)
    resp = jsonify(body)
    resp.status_code = 416
    resp.headers["Content-Range"] = f"bytes */{size}"
    resp.headers["Accept-Ranges"] = "bytes"
    return resp


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


def _clamp_suffix(size: int) -> None:
    """RFC 9110 14.1.2: a suffix range longer than the representation selects all of it (206), which werkzeug
    calls unsatisfiable (416): ``bytes=-100`` on 11 bytes is sent on as ``bytes=-11``."""
    spec = request.headers.get("Range", "").partition("=")[2]
    m = _RANGE_SPEC.match(spec.strip(" \t"))
    if m is not None and m.group(3) is not None and int(m.group(3)) > size > 0:
        request.environ["HTTP_RANGE"] = f"bytes=-{size}"


def send_ranged_file(path: Path, *, mimetype: str, etag: str, max_age: int,
                     download_name: str | None = None) -> Response:
    """``send_file`` (If-None-Match: 304) with Range as RFC 9110 wants it (``_ignore_range``) and a 416 in the
    API's error shape. Raises FileNotFoundError for a missing file."""
    size = path.stat().st_size
    if _ignore_range(size):
        request.environ.pop("HTTP_RANGE", None)
    else:
        _clamp_suffix(size)
    try:
        return send_file(path, mimetype=mimetype, conditional=True, etag=etag, max_age=max_age,
                         download_name=download_name)
    except RequestedRangeNotSatisfiable:
        return _range_not_satisfiable(size)


def send_blob(digest: str, digest_header: str, download_name: str | None = None) -> Response:
    """A stored blob as the answer (GET or HEAD; a single byte Range: 206/416, other Ranges ignored (200);
    If-None-Match: 304), held against GC while it is being sent. A HEAD by a client that may push renews an
    unreferenced blob's grace period: the client skips uploading what exists. A blob deleted meanwhile is a
    NotFound: the file is opened here, so a download that has started keeps its bytes even when it is deleted."""
    sv = current_app.extensions["docket"]
    if request.method == "HEAD" and current_app.extensions["docket_auth"].may_push():
        # a client checking what to push: part of a push in progress. Only one that may push: an anonymous HEAD
        # every few minutes must not keep an unreferenced blob forever
        sv.uploads.activity.touch()
        sv.blobs.keep(digest)  # an unreferenced blob gets a fresh grace: the client's next manifest uses it
    sv.downloads.acquire(digest)  # GC waits for in-flight downloads
    try:
        resp = send_ranged_file(sv.store.local_path(digest), mimetype="application/octet-stream", etag=digest,
                                max_age=BLOB_MAX_AGE, download_name=download_name)
    except FileNotFoundError as exc:
        sv.downloads.release(digest)
        raise NotFound(f"no blob {digest} in this registry", "it was deleted; push it again") from exc
    except BaseException:
        sv.downloads.release(digest)
        raise
    if resp.status_code == 416:
        sv.downloads.release(digest)  # no file in this answer
        return resp
    # werkzeug hands a direct-passthrough body to the server as is (call_on_close would never run): wrap it
    resp.response = _ReleaseOnClose(resp.response, lambda: sv.downloads.release(digest))
    if request.method == "GET":  # the registry's own account of the blob bytes it sent (the swarm spares these)
        metrics = current_app.extensions.get("docket_metrics")
        if metrics is not None:
            metrics.sending_blob(resp)  # bytes counted as the server sends them
        log.info("sending blob %s to %s: %d bytes%s", digest, request.remote_addr, resp.content_length or 0,
                 f" ({resp.headers['Content-Range']})" if resp.status_code == 206 else "")
    resp.headers[digest_header] = digest
    resp.cache_control.immutable = True
    return resp
