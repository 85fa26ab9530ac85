"""The registry's HTTP API (docs/http-api.md) as Python calls; server errors become ``docket.errors``.

One ``requests.Session`` per client, a (connect, read) timeout on every read and a deadline on every whole
request (deadline.py: a server that trickles bytes cannot hold a command), every reply read with a size cap
(``MAX_REPLY``), uploads streamed from an iterable of chunks (chunked transfer encoding: no temporary copy, never
the whole tarball in memory). Text the registry sends (error messages, hints) is escaped before it can reach a
terminal (``printable``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests

from docket import __version__
from docket import errors, jsonstrict
from docket.deadline import DeadlineExceeded, DeadlineSession, expired, extend, progress
from docket.client.digests import BLOB_DIGEST_RE
from docket.client.progress import printable
from docket.reference import Reference

log = logging.getLogger(__name__)

DEFAULT_HOST = "http://127.0.0.1"
DEFAULT_PORT = 8000
CONNECT_TIMEOUT = 5.0
MAX_TORRENT_BYTES = 4 * 1024 * 1024
MAX_REPLY = 8 * 1024 * 1024  # a record (1,000 layers: ~0.5 MB), a push's answer, an error body
MAX_LIST_REPLY = 64 * 1024 * 1024  # `docket images`: every record of the registry
MAX_ERROR_REPLY = 64 * 1024
# Bytes are capped above, but 64 MiB of "{}," parse into 21 million dicts (1.8 GB, 15 s) and `docket images` then
# drew a row for each (7 GB). A real listing within 64 MiB has under 500,000 objects and arrays (a layer
# descriptor alone is ~150 bytes), so these refuse only what no registry sends.
MAX_JSON_CONTAINERS = 1_000_000
MAX_IMAGES = 100_000
BLOB_CHUNK = 256 * 1024  # a blob download fails when one chunk takes longer than --timeout (deadline.py)
API = "/api/v1"
# A request the registry never answered (a connection refused or cut, a proxy's 502/503/504 page: one instance
# behind a load balancer died) is sent again this many times, after RETRY_BACKOFF * 2**n seconds, when sending it
# again cannot do anything twice: GET, HEAD, and a PUT whose body is in memory (docs/instances.md).
RETRIES = 3
RETRY_BACKOFF = 0.25
PROXY_STATUSES = (502, 503, 504)

_BY_CODE: dict[str, type[errors.DocketError]] = {}


def _collect(cls: type[errors.DocketError]) -> None:
    """The /api/v1 codes; the /v2 spec's codes (DistributionError) are mapped by HTTP status like any unknown code."""
    for sub in cls.__subclasses__():
        if not issubclass(sub, errors.DistributionError):
            _BY_CODE.setdefault(sub.code, sub)
            _collect(sub)


_collect(errors.DocketError)
_BY_STATUS: dict[int, type[errors.DocketError]] = {
    400: errors.InvalidRequest, 401: errors.Unauthorized, 403: errors.Unauthorized, 404: errors.NotFound,
    411: errors.InvalidRequest, 413: errors.TooLarge, 415: errors.InvalidRequest, 502: errors.TransferError,
    503: errors.ServiceUnavailable, 504: errors.ServiceUnavailable,
}


def base_url(host: str | None, port: int | None) -> str:
    """``http://127.0.0.1`` + 8000 -> ``http://127.0.0.1:8000``; a scheme or port already in ``host`` wins."""
    host = (host or DEFAULT_HOST).strip()
    if "://" not in host:
        host = "http://" + host
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.InvalidRequest(f"invalid registry host {host!r}",
                                    "give it as http://HOST or https://HOST[:PORT]")
    try:
        has_port = parts.port is not None
    except ValueError as exc:
        raise errors.InvalidRequest(f"invalid port in registry host {host!r}") from exc
    netloc = parts.netloc
    if not has_port:
        p = DEFAULT_PORT if port is None else port
        if not 0 < int(p) < 65536:
            raise errors.InvalidRequest(f"invalid registry port {p}", "give a port between 1 and 65535")
        netloc = f"{netloc}:{int(p)}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def _error_from_response(resp: requests.Response, what: str) -> errors.DocketError:
    """Turn a 4xx/5xx answer into the matching DocketError, keeping the server's message and hint."""
    body: Any = None
    try:  # the strict parser: a hostile error body (64 KiB of brackets) must not end in a RecursionError
        body = jsonstrict.loads(resp.content, what=f"{what}: the registry's error answer")
    except errors.DocketError:
        pass
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        cls = _BY_CODE.get(str(err.get("code")), _BY_STATUS.get(resp.status_code, errors.DocketError))
        hint = printable(err["hint"]) if isinstance(err.get("hint"), str) else None
        return cls(printable(err["message"]), hint)
    cls = _BY_STATUS.get(resp.status_code, errors.DocketError)
    text = printable((resp.text or "").strip().replace("\n", " ")[:200])
    msg = f"{what}: the registry answered HTTP {resp.status_code} {resp.reason or ''}".rstrip()
    if text:
        msg += f" ({text})"
    return cls(msg, "is --host/--port pointing at a docket-registry? check the registry's log")


def _tls_error(exc: Exception, what: str, url: str, ca_bundle: str | None) -> errors.DocketError:
    """A certificate problem names the host and the option that fixes it; other TLS failures the scheme."""
    text = str(exc)
    host = urlsplit(url).netloc
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text or "hostname" in text.lower():
        reason = text.split("certificate verify failed:", 1)[-1].split("(_ssl")[0].strip(" :')\"") \
            if "certificate verify failed" in text else "certificate does not match"
        hint = (f"the CA bundle {ca_bundle} does not vouch for {host}; check --ca-bundle / DOCKET_CA_BUNDLE"
                if ca_bundle else
                "if the registry uses a private CA or a self-signed certificate, pass its CA certificate with "
                "--ca-bundle FILE (or DOCKET_CA_BUNDLE)")
        return errors.ServiceUnavailable(f"{what}: the TLS certificate of {host} could not be verified ({reason})",
                                         hint)
    if "wrong version number" in text.lower() or "record layer failure" in text.lower():
        return errors.ServiceUnavailable(f"{what}: TLS handshake with {host} failed: the registry does not seem to "
                                         "speak HTTPS", "use http:// in --host / DOCKET_HOST")
    return errors.ServiceUnavailable(f"{what}: TLS error talking to {host}: {text}",
                                     "check the registry's certificate, --ca-bundle, and the scheme in --host")


class RegistryClient:
    """Calls to one registry. Thread-safe enough for one command at a time (one Session)."""

    def __init__(self, host: str | None = None, port: int | None = None, *, read_timeout: float = 60.0,
                 push_timeout: float = 600.0, connect_timeout: float = CONNECT_TIMEOUT,
                 session: requests.Session | None = None, token: str | None = None,
                 ca_bundle: str | None = None) -> None:
        self.url = base_url(host, port)
        self.read_timeout = read_timeout
        self.push_timeout = max(push_timeout, read_timeout)
        self.connect_timeout = connect_timeout
        self.session = session or DeadlineSession(read_timeout)
        self.session.headers["User-Agent"] = f"docket/{__version__}"
        self.has_token = bool(token)
        if token:
            token = token.strip()
            if not token or not all(33 <= ord(ch) < 127 for ch in token):
                raise errors.InvalidRequest("the token contains spaces or non-ASCII characters",
                                            "check DOCKET_TOKEN / DOCKET_TOKEN_FILE / --token")
            # requests drops Authorization when a redirect leaves the host, so it only goes to this registry
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.ca_bundle = ca_bundle
        if ca_bundle:
            self.session.verify = str(ca_bundle)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ---------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, what: str, *, read_timeout: float | None = None,
                 ok: tuple[int, ...] = (200,), deadline: float | None = None, limit: int = MAX_REPLY,
                 stream: bool = False, **kw: Any) -> requests.Response:
        """One request within ``deadline`` seconds (default: the read timeout) from start to the last byte.

        Without ``stream`` the body is read here, refused past ``limit`` bytes (decoded: a gzip bomb stops at
        the limit); with ``stream`` the caller reads it, the deadline still running until it closes the response.
        """
        url = self.url + path
        timeout = (self.connect_timeout, read_timeout or self.read_timeout)
        total = deadline or read_timeout or self.read_timeout
        if isinstance(self.session, DeadlineSession):
            kw["deadline"] = total
        retries = RETRIES if _replayable(method, kw) else 0
        for attempt in range(retries + 1):
            resp = self._send(method, url, what, timeout, total, retry=attempt < retries, **kw)
            if resp is not None:
                break
            time.sleep(RETRY_BACKOFF * 2**attempt)
        assert resp is not None
        if resp.status_code not in ok:
            try:
                resp._content = self._read(resp, MAX_ERROR_REPLY, what, truncate=True)
                err = _error_from_response(resp, what)
                if isinstance(err, errors.Unauthorized) and not isinstance(err, errors.Forbidden):
                    err = errors.Unauthorized(
                        f"{what}: the registry at {self.url} refused access: {err.message}",
                        ("the token given (--token / DOCKET_TOKEN / DOCKET_TOKEN_FILE) was refused; check it"
                         if self.has_token else
                         "set DOCKET_TOKEN (or DOCKET_TOKEN_FILE, or --token) to a token this registry accepts"))
                raise err
            finally:
                resp.close()
        if not stream:
            with resp:
                resp._content = self._read(resp, limit, what)
        return resp

    def _send(self, method: str, url: str, what: str, timeout: tuple[float, float], total: float, *,
              retry: bool, **kw: Any) -> requests.Response | None:
        """One attempt; None when it should be sent again (``retry``: the registry never answered it)."""
        try:
            # verify passed per request: a session-level verify loses to REQUESTS_CA_BUNDLE (requests#3829)
            resp = self.session.request(method, url, timeout=timeout, verify=self.session.verify, stream=True, **kw)
        except DeadlineExceeded as exc:
            raise self._deadline_error(what, total) from exc
        except requests.exceptions.SSLError as exc:
            raise _tls_error(exc, what, self.url, self.ca_bundle) from exc
        except requests.exceptions.ConnectTimeout as exc:
            raise errors.ServiceUnavailable(f"cannot reach the registry at {self.url} (connect timed out)",
                                            "is docket-registry running? check --host/--port") from exc
        except requests.exceptions.ReadTimeout as exc:
            raise errors.ServiceUnavailable(
                f"{what}: the registry at {self.url} did not answer within {timeout[1]:g} s",
                "the registry may be overloaded; retry, or raise --timeout") from exc
        except requests.exceptions.ConnectionError as exc:
            if retry:
                log.info("%s: %s; sending it again", what, str(exc).splitlines()[0][:200])
                return None
            if "Connection aborted" in str(exc) or "RemoteDisconnected" in str(exc):
                raise errors.ServiceUnavailable(
                    f"{what}: the registry at {self.url} closed the connection without answering",
                    "if it serves HTTPS, use https:// in --host / DOCKET_HOST; else check the registry's log") from exc
            raise errors.ServiceUnavailable(f"cannot reach the registry at {self.url}",
                                            "is docket-registry running? check --host/--port") from exc
        except requests.exceptions.RequestException as exc:
            raise errors.ServiceUnavailable(f"{what}: request to {url} failed: {exc}") from exc
        if retry and resp.status_code in PROXY_STATUSES and not _docket_error(resp):
            log.info("%s: HTTP %d from a proxy; sending it again", what, resp.status_code)
            resp.close()
            return None
        return resp

    def _deadline_error(self, what: str, seconds: float) -> errors.ServiceUnavailable:
        return errors.ServiceUnavailable(
            f"{what}: the registry at {self.url} did not answer within {seconds:g} s (the whole answer, not "
            "just its first bytes)",
            "the registry is overloaded or misbehaving; retry, or raise --timeout")

    def _read(self, resp: requests.Response, limit: int, what: str, truncate: bool = False) -> bytes:
        """The body, at most ``limit`` bytes after decoding (more: IntegrityError, or cut when ``truncate``)."""
        buf = bytearray()
        try:
            for chunk in resp.iter_content(64 * 1024):
                buf += chunk
                if len(buf) > limit:
                    if truncate:
                        return bytes(buf[:limit])
                    raise errors.IntegrityError(
                        f"{what}: the registry's answer is larger than {limit} bytes; refused",
                        "the registry is broken or hostile; nothing was written")
        except requests.exceptions.RequestException as exc:
            if expired(resp):
                raise self._deadline_error(what, resp.watch.seconds) from exc  # type: ignore[attr-defined]
            raise errors.TransferError(f"{what}: the connection to {self.url} broke: {exc}",
                                       "retry; check the registry's log") from exc
        if expired(resp):  # a shutdown mid-body can look like the end of a body without a length
            raise self._deadline_error(what, resp.watch.seconds)  # type: ignore[attr-defined]
        return bytes(buf)

    def _json(self, resp: requests.Response, what: str) -> Any:
        """The answer parsed by the project's strict parser (jsonstrict: depth, duplicate keys, int64, UTF-8).

        Something that is not JSON at all (a proxy's HTML page) is the wrong server (exit 8); a JSON document
        the parser refuses (100,000 nested brackets, duplicate keys) is a broken or hostile registry (exit 6).
        """
        body = resp.content
        containers = body.count(b"{") + body.count(b"[")  # C speed, before the parser builds any of them
        if containers > MAX_JSON_CONTAINERS:
            raise errors.IntegrityError(f"{what}: the registry's answer holds more than {MAX_JSON_CONTAINERS} "
                                        "objects and arrays; refused", "the registry is broken or hostile")
        try:
            return jsonstrict.loads(body, what=f"{what}: the registry's answer")
        except errors.InvalidJSON as exc:
            if body.lstrip()[:1] in (b"{", b"["):
                raise errors.IntegrityError(f"{exc.message}; refused", "the registry is broken or hostile") from exc
            raise errors.ServiceUnavailable(f"{what}: the registry at {self.url} sent a reply that is not JSON",
                                            "is --host/--port pointing at a docket-registry?") from exc

    @staticmethod
    def _tag_path(ref: Reference) -> str:
        return f"{API}/repositories/{quote(ref.repository, safe='/')}/tags/{quote(ref.tag, safe='')}"

    # -- API ---------------------------------------------------------------------------------------------

    def get_image(self, ref: Reference) -> dict[str, Any]:
        what = f"looking up {ref}"
        try:
            resp = self._request("GET", self._tag_path(ref), what)
        except errors.NotFound as exc:
            raise errors.NotFound(f"{ref} is not in the registry at {self.url}",
                                  "`docket images` lists what it has; `docket push` adds it") from exc
        record = self._json(resp, what)
        if not isinstance(record, dict):
            raise errors.ServiceUnavailable(f"{what}: unexpected reply from {self.url}")
        return record

    def list_images(self) -> list[dict[str, Any]]:
        what = "listing images"
        body = self._json(self._request("GET", f"{API}/images", what, limit=MAX_LIST_REPLY), what)
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(images, list):
            raise errors.ServiceUnavailable(f"{what}: unexpected reply from {self.url}",
                                            "is --host/--port pointing at a docket-registry?")
        if len(images) > MAX_IMAGES:
            raise errors.IntegrityError(f"{what}: the registry lists {len(images)} images, more than {MAX_IMAGES}; "
                                        "refused", "the registry is broken or hostile")
        return [i for i in images if isinstance(i, dict)]

    def list_hosts(self) -> list[dict[str, Any]]:
        """The hosts whose agents reported in (``GET /api/v1/hosts``)."""
        what = "listing hosts"
        body = self._json(self._request("GET", f"{API}/hosts", what, limit=MAX_LIST_REPLY), what)
        hosts = body.get("hosts") if isinstance(body, dict) else None
        if not isinstance(hosts, list):
            raise errors.ServiceUnavailable(f"{what}: unexpected reply from {self.url}",
                                            "is --host/--port pointing at a docket-registry that lists hosts?")
        return [h for h in hosts if isinstance(h, dict)]

    def get_torrent(self, digest: str) -> bytes:
        """The .torrent of a blob, capped at 4 MiB (ctorrent's limit) while reading."""
        if not BLOB_DIGEST_RE.match(digest):
            raise errors.IntegrityError(f"the registry sent an invalid digest {digest!r}")
        what = f"fetching the torrent of {digest}"
        return self._request("GET", f"{API}/blobs/{digest}/torrent", what, limit=MAX_TORRENT_BYTES).content

    def tracker(self) -> dict[str, Any]:
        what = "asking for the tracker"
        return self._json(self._request("GET", f"{API}/tracker", what), what)

    def _stream_upload(self, method: str, path: str, what: str, chunks: Iterable[bytes],
                       progress_cb: Callable[[int], None] | None, length: int | None = None,
                       **kw: Any) -> requests.Response:
        """Send ``chunks`` as a streamed (chunked) body; the response once the registry has answered.

        ``progress_cb(bytes_sent_so_far)`` is called after each chunk. An exception raised by ``chunks``
        (the docker export failing) is re-raised as itself, not as a network error; the server then sees a
        truncated chunked body and stores nothing.
        """
        failure: list[BaseException] = []
        sent = 0

        def body() -> Iterator[bytes]:
            nonlocal sent
            try:
                for chunk in chunks:
                    if not chunk:
                        continue
                    sent += len(chunk)
                    yield chunk
                    progress()  # the upload moves: the request's deadline counts from the last chunk
                    if progress_cb:
                        progress_cb(sent)
            except BaseException as exc:  # noqa: BLE001 - remembered and re-raised below
                failure.append(exc)
                raise

        try:
            data: Any = body() if length is None else _SizedBody(body(), length)  # Content-Length, not chunked
            return self._request(method, path, what, ok=(200, 201), data=data,
                                 read_timeout=self.push_timeout, **kw)
        except BaseException as exc:
            if failure:
                raise failure[0] from None
            if isinstance(exc, errors.ServiceUnavailable) and sent:
                raise errors.TransferError(
                    f"{what}: the connection to {self.url} broke after {sent} bytes",
                    "the registry may have refused the upload (size limit?) or stopped; check its log") from exc
            raise

    # -- layers (docs/layers.md) ---------------------------------------------------------------------------

    def head_blob(self, digest: str) -> int | None:
        """Size of the blob when the registry has it, else None."""
        if not BLOB_DIGEST_RE.match(digest):
            raise errors.InvalidRequest(f"invalid digest {digest!r}")
        what = f"asking the registry for {digest}"
        resp = self._request("HEAD", f"{API}/blobs/{digest}", what, ok=(200, 404))
        with resp:
            if resp.status_code == 404:
                return None
            try:
                return int(resp.headers.get("Content-Length", ""))
            except ValueError as exc:
                raise errors.ServiceUnavailable(f"{what}: no Content-Length in the registry's answer") from exc

    def get_blob(self, digest: str, limit: int) -> bytes:
        """A small blob (the config) over plain HTTP, refused when larger than ``limit``."""
        if not BLOB_DIGEST_RE.match(digest):
            raise errors.IntegrityError(f"the registry sent an invalid digest {digest!r}")
        what = f"fetching {digest}"
        return self._request("GET", f"{API}/blobs/{digest}", what, limit=limit).content

    def iter_blob(self, digest: str, start: int = 0, end: int | None = None,
                  chunk_size: int = BLOB_CHUNK) -> Iterator[bytes]:
        """The bytes ``[start, end)`` of a blob, streamed (``Range`` when not the whole blob).

        A server that ignores ``Range`` (200 instead of 206) still works: the bytes before ``start`` are skipped.
        Nothing after ``end`` is yielded. Network failures become TransferError (the caller resumes). The deadline
        is on progress: the headers and then every ``chunk_size`` bytes must arrive within the read timeout
        (60 s: at least ~4 KiB/s), however large the blob.
        """
        if not BLOB_DIGEST_RE.match(digest):
            raise errors.IntegrityError(f"the registry sent an invalid digest {digest!r}")
        what = f"downloading {digest} over HTTP"
        headers = {"Accept-Encoding": "identity"}  # byte ranges of the stored bytes, never of a re-encoding
        ranged = start > 0 or end is not None
        if ranged:
            headers["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        resp = self._request("GET", f"{API}/blobs/{digest}", what, ok=(200, 206), stream=True, headers=headers,
                             deadline=self.read_timeout)
        with resp:
            skip = 0
            if resp.status_code == 206:
                got = resp.headers.get("Content-Range", "")
                if not got.startswith(f"bytes {start}-"):
                    raise errors.TransferError(f"{what}: asked for bytes from {start}, the registry sent {got!r}")
            elif ranged:
                skip = start
                log.info("%s: the server ignored Range; skipping %d bytes", what, start)
            left = None if end is None else end - start
            try:
                for chunk in resp.iter_content(chunk_size):
                    extend(resp)
                    if skip:
                        if len(chunk) <= skip:
                            skip -= len(chunk)
                            continue
                        chunk, skip = chunk[skip:], 0
                    if left is not None:
                        chunk = chunk[:left]
                        left -= len(chunk)
                    if chunk:
                        yield chunk
                    if left == 0:
                        return
            except requests.exceptions.RequestException as exc:
                if expired(resp):
                    raise errors.TransferError(
                        f"{what}: the registry at {self.url} sent less than {chunk_size} bytes in "
                        f"{self.read_timeout:g} s", "a retry resumes from what was received") from exc
                raise errors.TransferError(f"{what}: the connection to {self.url} failed: {exc}",
                                           "a retry resumes from what was received") from exc
            if expired(resp):
                raise errors.TransferError(f"{what}: the registry at {self.url} sent less than {chunk_size} bytes "
                                           f"in {self.read_timeout:g} s", "a retry resumes from what was received")

    def check_manifest_push_allowed(self, ref: Reference) -> None:
        """A bodiless manifest PUT: 401/403 when the token may not push (before streaming any layer)."""
        what = f"pushing {ref}"
        try:
            self._request("PUT", self._manifest_path(ref), what, ok=(400,), data=b"",
                          headers={"Content-Type": "application/json", "Content-Length": "0"})
        except (errors.Unauthorized, errors.ServiceUnavailable):
            raise
        except errors.DocketError:
            pass

    def upload_blob(self, kind: str, chunks: Iterable[bytes], digest: str | None = None,
                    progress_cb: Callable[[int], None] | None = None, size: int | None = None) -> dict[str, Any]:
        """``POST /blobs?kind=..`` with the body streamed from ``chunks`` (chunked encoding); the reply dict.

        As in ``_stream_upload``, an exception raised by ``chunks`` is re-raised as itself.
        """
        params = {"kind": kind}
        if digest:
            params["digest"] = digest
        what = f"uploading a {kind} blob" + (f" {digest}" if digest else "")
        resp = self._stream_upload("POST", f"{API}/blobs", what, chunks, progress_cb, length=size, params=params,
                                   headers={"Content-Type": "application/octet-stream"})
        reply = self._json(resp, what)
        if not isinstance(reply, dict) or not isinstance(reply.get("digest"), str):
            raise errors.ServiceUnavailable(f"{what}: unexpected reply from {self.url}")
        return reply

    def put_manifest(self, ref: Reference, config: str, layers: list[str]) -> dict[str, Any]:
        what = f"committing the manifest of {ref}"
        resp = self._request("PUT", self._manifest_path(ref), what, ok=(200, 201),
                             json={"config": config, "layers": layers})
        record = self._json(resp, what)
        if not isinstance(record, dict):
            raise errors.ServiceUnavailable(f"{what}: unexpected reply from {self.url}")
        return record

    def delete_tag(self, ref: Reference) -> None:
        """``DELETE`` the tag (push token) and, once unused, its manifest (``prune``): GC frees its blobs."""
        what = f"deleting {ref}"
        try:
            self._request("DELETE", self._tag_path(ref), what, ok=(204,), params={"prune": "true"})
        except errors.NotFound as exc:
            raise errors.NotFound(f"{ref} is not in the registry at {self.url}",
                                  "`docket images` lists what it has") from exc

    def retention(self, *, dry_run: bool, keep_tags: int | None = None,
                  keep_patterns: tuple[str, ...] = ()) -> dict[str, Any]:
        """``POST /admin/retention`` (push token): what the policy removed, or would remove (``dry_run``)."""
        what = "running the retention policy" if not dry_run else "asking what the retention policy would remove"
        body: dict[str, Any] = {"dry_run": dry_run}
        if keep_tags is not None:
            body["keep_tags"] = keep_tags
        if keep_patterns:
            body["keep_patterns"] = list(keep_patterns)
        reply = self._json(self._request("POST", f"{API}/admin/retention", what, json=body,
                                         read_timeout=self.push_timeout, limit=MAX_LIST_REPLY), what)
        if not isinstance(reply, dict) or not isinstance(reply.get("removed"), list):
            raise errors.ServiceUnavailable(f"{what}: unexpected reply from {self.url}",
                                            "is --host/--port pointing at a docket-registry with retention?")
        return reply

    @staticmethod
    def _manifest_path(ref: Reference) -> str:
        return f"{API}/repositories/{quote(ref.repository, safe='/')}/manifests/{quote(ref.tag, safe='')}"


class _SizedBody:
    """An iterable body with a length: requests then sends Content-Length instead of chunked encoding, so the
    registry knows the size up front (it picks the torrent piece size from it and hashes pieces while receiving)."""

    def __init__(self, chunks: Iterator[bytes], length: int) -> None:
        self._chunks = chunks
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks


def _replayable(method: str, kw: dict[str, Any]) -> bool:
    """Whether sending the request again cannot do anything twice, and its body can be sent again."""
    data = kw.get("data")
    return (method in ("GET", "HEAD") or (method == "PUT" and (data is None or isinstance(data, (bytes, str))))) \
        and "files" not in kw


def _docket_error(resp: requests.Response) -> bool:
    """Whether an error answer comes from a docket registry (JSON), not from a proxy in front of it."""
    return resp.headers.get("Content-Type", "").split(";")[0].strip() == "application/json"
