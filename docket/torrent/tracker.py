"""Ask an HTTP tracker about one torrent: scrape counts, and whether it accepts announces for a hash."""

from __future__ import annotations

import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import requests
import urllib3

from docket.deadline import DeadlineSession
from docket.errors import InvalidRequest, ServiceUnavailable

_HEX40 = re.compile(r"\A[0-9a-f]{40}\Z")
MAX_REPLY = 1024 * 1024


@dataclass
class ScrapeResult:
    complete: int  # seeders
    incomplete: int  # leechers
    downloaded: int  # completed downloads the tracker has counted


class BdecodeError(ValueError):
    pass


def bdecode(data: bytes) -> Any:
    """Strict bdecode of a whole buffer (dict keys stay bytes). Raises BdecodeError on anything malformed."""
    if not isinstance(data, (bytes, bytearray)):
        raise BdecodeError("bencoded data must be bytes")
    value, end = _decode(bytes(data), 0, 0)
    if end != len(data):
        raise BdecodeError(f"trailing data at offset {end}")
    return value


def _decode(b: bytes, i: int, depth: int) -> tuple[Any, int]:
    if depth > 64:
        raise BdecodeError("nesting too deep")
    if i >= len(b):
        raise BdecodeError("unexpected end of data")
    c = b[i : i + 1]
    if c == b"i":
        end = b.find(b"e", i + 1)
        if end < 0:
            raise BdecodeError("unterminated integer")
        digits = b[i + 1 : end]
        if not re.fullmatch(rb"-?(0|[1-9][0-9]*)", digits) or digits == b"-0":
            raise BdecodeError(f"bad integer {digits!r}")
        return int(digits), end + 1
    if c == b"l":
        i += 1
        items = []
        while b[i : i + 1] != b"e":
            v, i = _decode(b, i, depth + 1)
            items.append(v)
        return items, i + 1
    if c == b"d":
        i += 1
        d: dict[bytes, Any] = {}
        while b[i : i + 1] != b"e":
            k, i = _decode(b, i, depth + 1)
            if not isinstance(k, bytes):
                raise BdecodeError("dictionary key is not a string")
            d[k], i = _decode(b, i, depth + 1)
        return d, i + 1
    if c.isdigit():
        colon = b.find(b":", i)
        if colon < 0 or not re.fullmatch(rb"0|[1-9][0-9]*", b[i:colon]):
            raise BdecodeError("bad string length")
        n = int(b[i:colon])
        start = colon + 1
        if start + n > len(b):
            raise BdecodeError("string runs past end of data")
        return b[start : start + n], start + n
    raise BdecodeError(f"unexpected byte {c!r} at offset {i}")


def scrape_url(announce_url: str) -> str:
    """BEP 48 convention: replace the last path component "announce" with "scrape"."""
    parts = urllib.parse.urlsplit(announce_url)
    head, _, last = parts.path.rpartition("/")
    if not last.startswith("announce"):
        raise InvalidRequest(f"tracker {announce_url} does not support scrape (path must end in /announce)")
    return urllib.parse.urlunsplit(parts._replace(path=f"{head}/scrape{last[len('announce'):]}"))


def _check_hash(info_hash: str) -> bytes:
    h = info_hash.strip().lower()
    if not _HEX40.match(h):
        raise InvalidRequest(f"not an info hash: {info_hash!r}")
    return bytes.fromhex(h)


def _get(url: str, query: str, timeout: float, session: requests.Session | None) -> Any:
    """One tracker request. ``timeout`` is per read; without a ``session`` of the caller's, a whole-request
    deadline of twice that applies too (a tracker that trickles its answer cannot hold the caller)."""
    full = f"{url}{'&' if '?' in url else '?'}{query}"
    if session is None:
        with DeadlineSession(2 * timeout) as own:
            return _get(url, query, timeout, own)
    getter = session.get
    try:
        r = getter(full, timeout=timeout, stream=True)
        try:
            body = r.raw.read(MAX_REPLY + 1, decode_content=True)
        except urllib3.exceptions.HTTPError as exc:
            raise requests.ConnectionError(exc) from exc
        finally:
            r.close()
        watch = getattr(r, "watch", None)  # a DeadlineSession's: the reply may have been cut at its deadline
        if watch is not None and watch.expired:
            raise requests.Timeout(f"no complete reply within {watch.seconds:g} s")
    except requests.RequestException as exc:
        raise ServiceUnavailable(f"tracker {url} is not reachable: {exc}",
                                 hint="is opentracker running? (docket-registry starts it)") from exc
    if r.status_code != 200:
        raise ServiceUnavailable(f"tracker {url} answered HTTP {r.status_code}")
    if len(body) > MAX_REPLY:
        raise ServiceUnavailable(f"tracker {url} reply too large")
    try:
        reply = bdecode(body)
    except BdecodeError as exc:
        raise ServiceUnavailable(f"tracker {url} sent a malformed reply: {exc}") from exc
    if not isinstance(reply, dict):
        raise ServiceUnavailable(f"tracker {url} sent a malformed reply (not a dictionary)")
    return reply


def scrape(announce_url: str, info_hash: str, *, timeout: float = 5.0,
           session: requests.Session | None = None) -> ScrapeResult:
    """Seeder/leecher counts for one torrent. Unknown (or not whitelisted) hashes count as all zeros.

    ``timeout`` is per read; the whole request ends within twice that, or the deadline of ``session``.
    """
    raw = _check_hash(info_hash)
    url = scrape_url(announce_url)
    reply = _get(url, "info_hash=" + urllib.parse.quote_from_bytes(raw, safe=""), timeout, session)
    if b"failure reason" in reply:
        raise ServiceUnavailable(f"tracker refused scrape: {reply[b'failure reason']!r}")
    files = reply.get(b"files", {})
    if not isinstance(files, dict):
        raise ServiceUnavailable("tracker scrape reply has no files dictionary")
    return _counts(files.get(raw))


MAX_SCRAPE_BATCH = 64  # info hashes in one scrape request (opentracker answers up to 64 at once)


def scrape_many(announce_url: str, info_hashes: list[str], *, timeout: float = 5.0,
                session: requests.Session | None = None, budget: float | None = None) -> dict[str, ScrapeResult]:
    """Counts for many torrents, MAX_SCRAPE_BATCH per request (BEP 48's repeated ``info_hash``; the registry's
    guard passes them on); a hash the tracker does not list counts as zeros. Raises ServiceUnavailable like
    ``scrape``, and when the requests together took longer than ``budget`` seconds (checked between them)."""
    url = scrape_url(announce_url)
    raws = {_check_hash(h): h.strip().lower() for h in info_hashes}
    out: dict[str, ScrapeResult] = {}
    keys = list(raws)
    started = time.monotonic()
    for i in range(0, len(keys), MAX_SCRAPE_BATCH):
        if budget is not None and i and time.monotonic() - started > budget:
            raise ServiceUnavailable(f"scraping {len(keys)} torrents took over {budget:g} s")
        batch = keys[i:i + MAX_SCRAPE_BATCH]
        query = "&".join("info_hash=" + urllib.parse.quote_from_bytes(raw, safe="") for raw in batch)
        reply = _get(url, query, timeout, session)
        if b"failure reason" in reply:
            raise ServiceUnavailable(f"tracker refused scrape: {reply[b'failure reason']!r}")
        files = reply.get(b"files", {})
        if not isinstance(files, dict):
            raise ServiceUnavailable("tracker scrape reply has no files dictionary")
        for raw in batch:
            out[raws[raw]] = _counts(files.get(raw))
    return out


def _counts(entry: Any) -> ScrapeResult:
    if entry is None:
        return ScrapeResult(0, 0, 0)
    if not isinstance(entry, dict):
        raise ServiceUnavailable("tracker scrape entry is not a dictionary")

    def count(key: bytes) -> int:
        v = entry.get(key, 0)
        return v if isinstance(v, int) and v >= 0 else 0

    return ScrapeResult(count(b"complete"), count(b"incomplete"), count(b"downloaded"))


def announce_ok(announce_url: str, info_hash: str, timeout: float = 5.0,
                session: requests.Session | None = None) -> bool:
    """True if the tracker is up and accepts announces for ``info_hash`` (i.e. it is whitelisted).

    opentracker skips the whitelist check for "stopped" events, so this sends a real announce (random peer id,
    port 1, left=0, numwant=0) and, if accepted, a "stopped" one right after: a phantom peer exists for a moment.
    Raises ServiceUnavailable if the tracker cannot be reached.
    """
    raw = _check_hash(info_hash)
    peer_id = b"-DK0001-" + secrets.token_hex(6).encode()
    params = {"info_hash": raw, "peer_id": peer_id, "port": 1, "uploaded": 0, "downloaded": 0, "left": 0,
              "compact": 1, "numwant": 0}
    # quote, not urlencode's default quote_plus: opentracker reads "+" as a plus sign, so a hash with a 0x20 byte
    # (~7.5 % of them) was never "accepted" and the registry waited its whole timeout on every such layer
    reply = _get(announce_url, urllib.parse.urlencode(params, quote_via=urllib.parse.quote), timeout, session)
    if b"failure reason" in reply:
        return False
    _get(announce_url, urllib.parse.urlencode({**params, "event": "stopped"}, quote_via=urllib.parse.quote), timeout,
         session)
    return True
