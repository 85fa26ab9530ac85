"""A front for opentracker that answers announces and single-torrent scrapes, and nothing else.

Debian's opentracker answers a *full scrape* (``GET /scrape`` without ``info_hash``: every tracked info hash with
its counts) to anyone, and no option of that build turns it off (only ``/stats`` can be limited to ``-A``
addresses). On a registry with read tokens the info hashes are the capability that opens the swarm, so the
registry runs opentracker on a private loopback port and puts this guard on the public one:

* only ``GET /announce?...`` and ``GET /scrape?info_hash=...`` pass, with the query cut down to the parameters
  of BEP 3 / BEP 48 (``info_hash``, ``peer_id``, ``port``, ...); full scrape, ``/stats`` in every mode and any
  other path are a 404 to everyone;
* opentracker records the TCP source address of an announce and ignores ``ip=`` (and this build has no
  X-Forwarded-For support), so a plain proxy would make every peer look like the proxy. The guard therefore
  connects to opentracker *from* a loopback address of its own that stands for the real peer (127.64.0.0/10 is
  all local on Linux: no setup needed) and maps the compact peer list of the reply back to the real addresses.

The mapping lives as long as the guard; the guard and its opentracker start and stop together.
"""

from __future__ import annotations

import collections
import ipaddress
import logging
import re
import socket
import socketserver
import threading
import time
from urllib.parse import unquote_to_bytes

from docket.torrent.tracker import BdecodeError, bdecode

log = logging.getLogger(__name__)

ANNOUNCE_KEYS = frozenset({b"info_hash", b"peer_id", b"port", b"uploaded", b"downloaded", b"left", b"event",
                           b"compact", b"numwant", b"key", b"no_peer_id", b"corrupt", b"supportcrypto"})
SCRAPE_KEYS = frozenset({b"info_hash"})
MAX_REQUEST = 8 * 1024  # a tracker request is one line and a few headers
MAX_REPLY = 64 * 1024  # opentracker returns at most 200 peers (6 bytes each)
REQUEST_DEADLINE = 10.0  # whole request, however slowly it trickles in
UPSTREAM_TIMEOUT = 5.0
MAX_CONNECTIONS = 512  # at once; more are closed at once (each costs a thread)
MAPPED_NET = ipaddress.IPv4Network("127.64.0.0/10")
_QUERY_CHARS = re.compile(rb"[A-Za-z0-9%&=._~*!'()+,;:@/$-]*")


def bencode(value: object) -> bytes:
    """Encode the few types a tracker reply holds (ints, byte strings, lists, dicts with byte keys)."""
    if isinstance(value, bool) or not isinstance(value, (int, bytes, list, dict)):
        raise TypeError(f"cannot bencode {type(value).__name__}")
    if isinstance(value, int):
        return b"i%de" % value
    if isinstance(value, bytes):
        return b"%d:%s" % (len(value), value)
    if isinstance(value, list):
        return b"l" + b"".join(bencode(v) for v in value) + b"e"
    return b"d" + b"".join(bencode(k) + bencode(value[k]) for k in sorted(value)) + b"e"


class AddressMap:
    """Real peer IPv4 address <-> the loopback address the guard uses for it towards opentracker.

    Bounded: when every mapped address is taken, the one unused longest is given to the newcomer (opentracker then
    hands out the old peer's entry under the new address until it expires; such an entry is dropped from replies
    only if its address is no longer mapped)."""

    def __init__(self, network: ipaddress.IPv4Network = MAPPED_NET) -> None:
        self._first = int(network.network_address) + 1
        self._size = network.num_addresses - 2
        self._by_real: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._by_mapped: dict[str, str] = {}
        self._lock = threading.Lock()

    def mapped(self, real: str) -> str:
        with self._lock:
            m = self._by_real.get(real)
            if m is not None:
                self._by_real.move_to_end(real)
                return m
            if len(self._by_real) < self._size:
                m = str(ipaddress.IPv4Address(self._first + len(self._by_real)))
            else:
                _, m = self._by_real.popitem(last=False)
                del self._by_mapped[m]
            self._by_real[real] = m
            self._by_mapped[m] = real
            return m

    def real(self, mapped: str) -> str | None:
        with self._lock:
            return self._by_mapped.get(mapped)

    def __len__(self) -> int:
        return len(self._by_real)


def filter_query(query: bytes, allowed: frozenset[bytes]) -> bytes | None:
    """The query with only ``allowed`` keys, as sent (no re-encoding); None when it holds no ``info_hash``."""
    if not _QUERY_CHARS.fullmatch(query):
        return None
    kept = [p for p in query.split(b"&") if p.partition(b"=")[0] in allowed]
    if not any(p.startswith(b"info_hash=") for p in kept):
        return None
    return b"&".join(kept)


def unmap_peers(body: bytes, addresses: AddressMap) -> bytes:
    """Rewrite the compact ``peers`` of an announce reply from mapped to real addresses (unknown ones dropped)."""
    try:
        reply = bdecode(body)
    except BdecodeError:
        return body  # not an announce reply we understand (a failure text): nothing to rewrite
    if not isinstance(reply, dict) or not isinstance(reply.get(b"peers"), bytes):
        return body
    peers = reply[b"peers"]
    out = bytearray()
    for i in range(0, len(peers) - len(peers) % 6, 6):
        real = addresses.real(socket.inet_ntoa(peers[i:i + 4]))
        if real is not None:
            out += socket.inet_aton(real) + peers[i + 4:i + 6]
    reply[b"peers"] = bytes(out)
    return bencode(reply)


def _reply(status: str, body: bytes, content_type: str = "text/plain") -> bytes:
    return (f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode() + body


NOT_FOUND = _reply("404 Not Found", b"d14:failure reason9:not founde")
BAD_REQUEST = _reply("400 Bad Request", b"d14:failure reason11:bad requeste")
UNAVAILABLE = _reply("503 Service Unavailable", b"d14:failure reason19:tracker unavailablee")


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        if not self.server.slots.acquire(blocking=False):
            return  # too many at once: closing is the cheapest answer
        try:
            self.request.sendall(self._answer())
        except OSError:
            pass
        finally:
            self.server.slots.release()

    def _read_head(self) -> bytes | None:
        sock: socket.socket = self.request
        end = time.monotonic() + REQUEST_DEADLINE
        data = bytearray()
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            left = end - time.monotonic()
            if left <= 0 or len(data) > MAX_REQUEST:
                return None
            sock.settimeout(left)
            try:
                chunk = sock.recv(4096)
            except OSError:
                return None
            if not chunk:
                break
            data += chunk
        return bytes(data)

    def _answer(self) -> bytes:
        head = self._read_head()
        if not head:
            return BAD_REQUEST
        parts = head.split(b"\n", 1)[0].strip().split(b" ")
        if len(parts) != 3 or parts[0] != b"GET" or not parts[2].startswith(b"HTTP/"):
            return BAD_REQUEST
        path, sep, query = parts[1].partition(b"?")
        path = unquote_to_bytes(path)
        if path == b"/announce":
            allowed = ANNOUNCE_KEYS
        elif path == b"/scrape" and sep:
            allowed = SCRAPE_KEYS
        else:
            return NOT_FOUND  # /stats (any mode), full scrape, anything else
        kept = filter_query(query, allowed)
        if kept is None:
            return BAD_REQUEST
        return self.server.forward(path + b"?" + kept, self.client_address[0])


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 1024

    def __init__(self, address: tuple[str, int], upstream: tuple[str, int]) -> None:
        super().__init__(address, _Handler)
        self.upstream = upstream
        self.addresses = AddressMap()
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def forward(self, target: bytes, client_ip: str) -> bytes:
        """Ask opentracker from the client's mapped address; answer with its reply, peers mapped back."""
        mapped = self.addresses.mapped(client_ip)
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as up:
                up.settimeout(UPSTREAM_TIMEOUT)
                up.bind((mapped, 0))
                up.connect(self.upstream)
                up.sendall(b"GET " + target + b" HTTP/1.0\r\n\r\n")
                raw = bytearray()
                while len(raw) <= MAX_REPLY:
                    chunk = up.recv(65536)
                    if not chunk:
                        break
                    raw += chunk
        except OSError as exc:
            log.warning("tracker guard: opentracker at %s:%d did not answer: %s", *self.upstream, exc)
            return UNAVAILABLE
        head, sep, body = bytes(raw).partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split(b" ", 1)
        if not sep or len(raw) > MAX_REPLY or len(status) != 2:
            return UNAVAILABLE
        code = status[1].decode("ascii", "replace")
        if code.startswith("200"):
            body = unmap_peers(body, self.addresses)
        return _reply(code, body)


def check_loopback() -> None:
    """Raise OSError unless a connection from a mapped address to 127.0.0.1 works (``lo`` can be down in a fresh
    network namespace): the guard cannot reach its opentracker otherwise."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        client.settimeout(2)
        try:
            client.bind((str(MAPPED_NET.network_address + 1), 0))
            client.connect(server.getsockname())
        except OSError as exc:
            raise OSError(f"loopback connections from {MAPPED_NET} to 127.0.0.1 fail ({exc.strerror or exc}): "
                          "is the lo interface up?") from exc


class TrackerGuard:
    """Listen on ``listen`` and pass announces and single-torrent scrapes on to opentracker at ``upstream``."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.listen = listen
        self.upstream = upstream
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        self._server = _Server(self.listen, self.upstream)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"tracker-guard-{self.listen[1]}", daemon=True)
        self._thread.start()
        log.info("tracker guard on %s:%d -> opentracker %s:%d (no stats, no full scrape)", *self.listen,
                 *self.upstream)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._thread = None
