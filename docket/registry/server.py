"""docket-registry's HTTP server: cheroot, with deadlines so that slow or idle clients cannot hold every worker.

Plain cheroot hands each new connection to a worker thread that then blocks reading the request: as many connections
as ``--threads`` that sent half a request line, or trickled a body, left no thread for anyone else; with TLS, one
silent client stopped the accepting thread itself for the whole socket timeout (the handshake ran there, blocking).
Here, on top of cheroot's own connection manager and thread pool:

* the TLS handshake and the request head (request line and headers) are read without a thread: the connection
  manager's selector thread reads whatever has arrived, non-blocking, and hands a connection to a worker only once
  its whole head is buffered. A head not complete ``header_timeout`` seconds after the connection was accepted (or
  after its first byte, on a kept-alive connection) gets the connection closed;
* a body must keep moving: for each ``body_timeout`` seconds spent waiting for the client, ``body_min_rate *
  body_timeout`` bytes (at least one) must have come in. Otherwise the read raises :class:`BodyTimeout`, the app
  answers 408 (nothing is stored) and the connection is closed. Responses are held to the same rate: a client that
  reads a download too slowly gets its connection closed;
* the worker pool grows when every worker is busy, up to ``max_threads``, and shrinks back to ``min_threads``.

Bodies still stream to the app as they arrive (a push hashes while it receives; nothing is buffered to disk first).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import selectors
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from cheroot import connections, errors, server, wsgi
from cheroot.makefile import MakeFile, StreamReader, StreamWriter
from cheroot.ssl.builtin import BuiltinSSLAdapter
from cheroot.workers import threadpool

from docket.errors import DocketError, ServiceUnavailable
from docket.registry.edges import is_v2, status_error

log = logging.getLogger("docket.registry.server")

MAX_HEADER_BYTES = 64 * 1024  # request line + headers; cheroot answers 413/414 beyond this (JSON: _Request)
HEAD_BUFFER = MAX_HEADER_BYTES + 1024  # a connection's read buffer holds any acceptable head whole
TRIM_INTERVAL = 10.0  # seconds between shrinking the pool back towards min_threads

READY, WAIT, CLOSED = "ready", "wait", "closed"


@dataclass(frozen=True)
class Deadlines:
    """How long a client may take. Defaults are generous for a slow link and short for an idle socket."""

    header_timeout: float = 10.0  # TLS handshake + request line + headers
    body_timeout: float = 20.0  # seconds of waiting for the client per window; also the longest wait for one byte
    body_min_rate: int = 1024  # bytes per second of waiting a body must move, per window (0: any byte will do)
    idle_timeout: float = 60.0  # a kept-alive connection between requests; a blocked send

    @property
    def body_min_bytes(self) -> int:
        return max(1, int(self.body_min_rate * self.body_timeout))


class BodyTimeout(TimeoutError):
    """A body moved slower than the deadlines allow. ``args[0]`` is cheroot's "timed out" (so cheroot answers 408
    itself if the app lets it through); ``str()`` says what was too slow."""

    def __init__(self, detail: str) -> None:
        super().__init__("timed out")
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class _Progress:
    """Bytes moved against seconds spent waiting for the peer, in windows of ``body_timeout`` seconds of waiting:
    only the client's slowness counts, not the app's own pauses between reads or writes."""

    def __init__(self, deadlines: Deadlines, what: str) -> None:
        self.deadlines, self.what = deadlines, what
        self.expired: BodyTimeout | None = None
        self.waited, self.moved = 0.0, 0

    def reset(self) -> None:
        self.expired, self.waited, self.moved = None, 0.0, 0

    def run(self, sock: socket.socket, op: Any, b: Any) -> int:
        """``op(b)`` (recv_into or send) on the blocking ``sock``, waiting at most what is left of the window."""
        if self.expired is not None:
            raise self.expired
        d = self.deadlines
        while True:
            left = d.body_timeout - self.waited
            if left <= 0:
                if self.moved < d.body_min_bytes:
                    self.expired = BodyTimeout(
                        f"{self.what} moved {self.moved} bytes in {d.body_timeout:g} s; this registry needs at "
                        f"least {d.body_min_bytes} (--body-min-rate {d.body_min_rate} B/s over --body-timeout "
                        f"{d.body_timeout:g} s)")
                    raise self.expired
                self.waited, self.moved = 0.0, 0
                continue
            current = sock.gettimeout()
            if not current or abs(current - left) > 1.0:  # few settimeout calls (each is a syscall); <= 1 s late
                sock.settimeout(left)
            start = time.monotonic()
            try:
                n = op(b)
            except TimeoutError:
                continue  # the window's waiting time is spent: judged at the top of the loop
            finally:
                self.waited += time.monotonic() - start
            self.moved += n
            return int(n)


class _DeadlineSocketIO(socket.SocketIO):
    """The raw stream under a connection's buffers: reads non-blocking while the selector gathers a head; in a
    worker, reads and writes that must keep making progress (:class:`_Progress`)."""

    def __init__(self, sock: socket.socket, deadlines: Deadlines, mode: str) -> None:
        super().__init__(sock, mode)
        self.eof = False
        self.progress = _Progress(deadlines, "the request body" if "r" in mode else "the response")

    @property
    def expired(self) -> BodyTimeout | None:
        return self.progress.expired

    def readinto(self, b: Any) -> int | None:
        self._checkClosed()
        self._checkReadable()
        if self._sock.gettimeout() == 0.0:  # the selector thread gathering a head
            try:
                n = self._sock.recv_into(b)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return None
            self.eof = self.eof or (n == 0 and len(b) > 0)
            return n
        return self.progress.run(self._sock, self._sock.recv_into, b)

    def write(self, b: Any) -> int | None:
        self._checkClosed()
        self._checkWritable()
        return self.progress.run(self._sock, self._sock.send, b)


class _Reader(StreamReader):
    """cheroot's socket reader over :class:`_DeadlineSocketIO`, with room for a whole request head."""

    def __init__(self, sock: socket.socket, deadlines: Deadlines) -> None:
        super(StreamReader, self).__init__(_DeadlineSocketIO(sock, deadlines, "rb"), HEAD_BUFFER)
        self.bytes_read = 0


class _Writer(StreamWriter):
    """cheroot's socket writer over :class:`_DeadlineSocketIO`: a client that reads a response too slowly frees its
    thread too."""

    def __init__(self, sock: socket.socket, deadlines: Deadlines, bufsize: int) -> None:
        super(StreamWriter, self).__init__(_DeadlineSocketIO(sock, deadlines, "wb"), bufsize)
        self.bytes_written = 0


class _StrictHeaders(server.HeaderReader):
    """cheroot's header reader, refusing (400) the framing that request smuggling through a proxy relies on and that
    cheroot takes leniently: a Content-Length that is not plain digits (``-5`` left the body to be parsed as the
    next request; ``+5``, ``1_0`` pass ``int()``), a Content-Length or Transfer-Encoding beside another, a header
    sent twice that must be one (cheroot keeps the last: two Content-Lengths or two Authorizations), whitespace
    before the colon, obsolete line folding (RFC 9112 5.1, 5.2, 6.1, 6.3)."""

    SINGLE = frozenset({b"Content-Length", b"Host", b"Authorization", b"Transfer-Encoding"})

    def __call__(self, rfile: Any, hdict: Any = None) -> Any:
        lines: list[bytes] = []

        class _Tap:
            def readline(self, *args: Any) -> bytes:
                line = rfile.readline(*args)
                lines.append(line)
                return bytes(line)

        hdict = super().__call__(_Tap(), hdict)
        seen: set[bytes] = set()
        for line in lines[:-1]:  # the last is the empty line
            if line[:1] in (b" ", b"\t"):
                raise ValueError("Obsolete line folding in the headers.")
            name = line.partition(b":")[0]
            if name != name.strip(b" \t"):
                raise ValueError("Whitespace before a header's colon.")
            key = name.title()
            if key in self.SINGLE and key in seen:
                raise ValueError(f"The {key.decode('latin-1')} header is sent more than once.")
            seen.add(key)
        length = hdict.get(b"Content-Length")
        if length is not None and not re.fullmatch(rb"[0-9]{1,19}", length):
            raise ValueError("Malformed Content-Length Header.")
        if length is not None and b"Transfer-Encoding" in hdict:
            raise ValueError("Both Content-Length and Transfer-Encoding: send one.")
        return hdict


# RFC 9112 7.1: chunk-size is hex digits, then optional extensions. cheroot parses it with int(x, 16), which takes
# 0x5, +5, -1, 1_0 and spaces (a proxy in front may read those differently), and reads the line without a limit
_CHUNK_SIZE_LINE = re.compile(rb"[0-9A-Fa-f]{1,16}(?:[ \t]*;[^\r\n]*)?\r\n")
MAX_CHUNK_LINE = 4096


class BadChunk(ConnectionError):
    """A chunked body whose framing is broken: the app's body readers (which catch OSError) answer 400, nothing is
    stored, and the connection is closed (its framing is lost)."""


class _ChunkLines:
    """The connection's reader as :class:`_StrictChunks` sees it: each line it reads is a chunk-size line (cheroot
    reads no trailers), checked whole and at most MAX_CHUNK_LINE bytes long."""

    def __init__(self, rfile: Any) -> None:
        self._rfile = rfile

    def readline(self, *args: Any) -> bytes:
        line = self._rfile.readline(MAX_CHUNK_LINE)
        if not _CHUNK_SIZE_LINE.fullmatch(line):
            raise BadChunk(f"malformed chunk-size line {bytes(line[:40])!r} in a chunked body")
        return bytes(line)

    def read(self, *args: Any) -> bytes:
        return bytes(self._rfile.read(*args))


class _StrictChunks(server.ChunkedRFile):
    def __init__(self, rfile: Any, maxlen: int, bufsize: int = 8192) -> None:
        super().__init__(_ChunkLines(rfile), maxlen, bufsize)

    def _fetch(self) -> None:
        try:
            super()._fetch()
        except ValueError as exc:  # cheroot's "Bad chunked transfer coding": an OSError the app answers 400
            raise BadChunk(str(exc)) from exc


class _Request(server.HTTPRequest):
    header_reader = _StrictHeaders()

    def respond(self) -> None:
        if not self.chunked_read:
            super().respond()
            return
        # cheroot's own respond() for a chunked body, with its chunk sizes read strictly (_StrictChunks)
        self.rfile = _StrictChunks(self.conn.rfile, self.server.max_request_body_size)
        self.server.gateway(self).respond()
        if self.ready:
            self.ensure_headers_sent()
        if self.chunked_write:
            self.conn.wfile.write(b"0\r\n\r\n")

    def parse_request(self) -> None:
        # the head is buffered whole (advance()); its start names the API for an error cheroot answers itself (a
        # 414 comes before any request line is parsed)
        with contextlib.suppress(OSError, ValueError):
            self._head_start = self.conn.rfile.peek(1)[:256]
        super().parse_request()

    def send_headers(self) -> None:
        if self.conn.rfile.raw.expired is not None:
            self.close_connection = True  # the rest of a too-slow body is not waited for (cheroot would read it)
        if isinstance(self.rfile, server.ChunkedRFile) and not self.rfile.closed:
            # cheroot drains an unread Content-Length body but not a chunked one: what the app left unread would be
            # parsed as the next request on this connection (a desync a proxy in front could be smuggled through)
            self.close_connection = True
        super().send_headers()

    def simple_response(self, status: Any, msg: Any = "") -> None:
        """cheroot's own answers (400 malformed request line or header, 408, 413 headers too large, 414, 501, 505,
        500) in the JSON error shape of the API the request is for -- the spec's ``{"errors": [...]}`` under
        /v2 -- instead of plain text."""
        code = int(str(status)[:3])
        if code < 400:
            super().simple_response(status, msg)
            return
        message = msg.decode("latin-1") if isinstance(msg, bytes) else str(msg or str(status)[4:])
        path = _target(getattr(self, "uri", None), getattr(self, "_head_start", b""))
        body = json.dumps(status_error(path, code, message.strip() or str(status)[4:],  # 408: as the app's
                                       v2_code="REQUEST_TIMEOUT" if code == 408 else None)).encode()
        self.close_connection = True  # cheroot closes the connection after each of these: say so
        v2 = "Docker-Distribution-API-Version: registry/2.0\r\n" if is_v2(path) else ""
        head = (f"{self.server.protocol} {status}\r\nContent-Length: {len(body)}\r\n"
                f"Content-Type: application/json\r\n{v2}Connection: close\r\n\r\n")
        try:
            self.conn.wfile.write(head.encode("latin-1") + body)
        except OSError as exc:
            if exc.args and exc.args[0] not in errors.socket_errors_to_ignore:
                raise


def _target(uri: bytes | None, head: bytes) -> bytes:
    """The request target: the parsed URI, else the second word of the buffered request line (path only)."""
    if not uri:
        words = head.split(b"\n", 1)[0].split(b" ", 2)
        uri = words[1] if len(words) > 1 else b""
    if b"://" in uri:  # absolute form
        uri = b"/" + uri.split(b"://", 1)[1].partition(b"/")[2]
    return uri.split(b"?", 1)[0]


class _Connection(server.HTTPConnection):
    """A connection that collects its request head in the selector thread (:meth:`advance`) before a worker runs
    it."""

    RequestHandlerClass = _Request

    def __init__(self, srv: Server, sock: socket.socket, makefile: Any = MakeFile) -> None:
        def files(s: socket.socket, mode: str = "r", bufsize: int = io.DEFAULT_BUFFER_SIZE) -> Any:
            # cheroot's makefile (plain or TLS) makes these same classes over a plain SocketIO
            return _Reader(s, srv.deadlines) if "r" in mode else _Writer(s, srv.deadlines, bufsize)

        super().__init__(srv, sock, files)
        self.deadlines = srv.deadlines
        self.handshaken = not isinstance(sock, ssl.SSLSocket)
        self.wants = selectors.EVENT_READ
        self.head_deadline: float | None = time.time() + srv.deadlines.header_timeout

    def communicate(self) -> bool:
        self.rfile.raw.progress.reset()
        self.wfile.raw.progress.reset()
        return bool(super().communicate())

    def advance(self) -> str:
        """Read what has arrived without blocking. READY: the whole head is buffered (or the buffer is full, which
        cheroot answers with 413/414); WAIT: park until more arrives; CLOSED: the peer left or the TLS failed."""
        sock = self.socket
        try:
            sock.settimeout(0.0)
            if not self.handshaken:
                state = self._handshake()
                if state != READY:
                    return state
            seen = -1
            while True:
                head = self.rfile.peek(HEAD_BUFFER)
                if b"\n\r\n" in head or b"\n\n" in head or len(head) >= HEAD_BUFFER:
                    return READY
                if self.rfile.raw.eof:
                    return CLOSED
                if len(head) == seen:
                    if head and self.head_deadline is None:  # a kept-alive connection began a request
                        self.head_deadline = time.time() + self.deadlines.header_timeout
                    return WAIT
                seen = len(head)
        except (OSError, ValueError):
            return CLOSED
        finally:
            with contextlib.suppress(OSError):
                sock.settimeout(self.deadlines.idle_timeout)

    def _handshake(self) -> str:
        sock: Any = self.socket
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self.wants = selectors.EVENT_READ
            return WAIT
        except ssl.SSLWantWriteError:
            self.wants = selectors.EVENT_WRITE
            return WAIT
        except OSError:  # ssl.SSLError included: plain HTTP on the HTTPS port is closed unanswered, as before
            return CLOSED
        self.handshaken = True
        self.wants = selectors.EVENT_READ
        self.ssl_env = self.server.ssl_adapter.get_environ(sock)
        return READY


class _Connections(connections.ConnectionManager):
    """cheroot's connection manager, which also parks connections whose head is incomplete, each with its own
    deadline."""

    def wait(self, conn: _Connection) -> None:
        self._selector.register(conn.socket.fileno(), conn.wants, data=conn)

    def _expire(self, threshold: float) -> None:
        now = time.time()
        late = [(fd, conn) for fd, conn in self._selector.connections if conn is not self.server and (
            (conn.last_used or 0) < threshold if conn.head_deadline is None else conn.head_deadline < now)]
        heads = 0
        for fd, conn in late:
            self._selector.unregister(fd)
            heads += conn.head_deadline is not None
            conn.close()
        if heads:
            log.debug("closed %d connection(s) whose request head did not arrive within %g s", heads,
                      self.server.deadlines.header_timeout)
        self.server.requests.trim()


class _Pool(threadpool.ThreadPool):
    """cheroot's pool, grown by one worker whenever a connection arrives and none is idle (up to ``max``), trimmed
    back towards ``min`` every TRIM_INTERVAL: a slow body holds its thread until its deadline, and nobody else should
    wait for that."""

    _last_trim = 0.0

    def put(self, obj: Any) -> None:
        if len(self._threads) < self.max and self.idle <= self.qsize:
            self._threads.append(self._spawn_worker())  # not grow(): it sleeps 0.1 s until the thread is ready
        super().put(obj)

    def trim(self) -> None:
        now = time.monotonic()
        if now - self._last_trim < TRIM_INTERVAL:
            return
        self._last_trim = now
        extra = min(self.idle, len(self._threads) - self.min)
        if extra > 0:
            self.shrink(extra)


class LazyTLSAdapter(BuiltinSSLAdapter):
    """cheroot's adapter runs the TLS handshake in the accepting thread, blocking; here it is only set up, and
    :meth:`_Connection.advance` drives it without blocking."""

    def wrap(self, sock: socket.socket) -> tuple[ssl.SSLSocket, dict[str, str]]:
        try:
            return self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), {}
        except OSError as exc:
            raise errors.FatalSSLAlert(*exc.args) from exc


class Server(wsgi.Server):
    """cheroot's WSGI server with the deadlines above (for HTTPS, set ``ssl_adapter`` to a LazyTLSAdapter)."""

    ConnectionClass = _Connection

    def __init__(self, bind_addr: tuple[str, int], app: Any, *, deadlines: Deadlines, min_threads: int,
                 max_threads: int, **kwargs: Any) -> None:
        super().__init__(bind_addr, app, numthreads=min_threads, max=max_threads,
                         timeout=int(deadlines.idle_timeout), **kwargs)
        self.deadlines = deadlines
        self.requests = _Pool(self, min=min_threads, max=max_threads)
        self.max_request_header_size = MAX_HEADER_BYTES  # cheroot's default is unlimited

    def prepare(self) -> None:
        super().prepare()
        plain, self._connections = self._connections, _Connections(self)
        plain._selector.close()

    def process_conn(self, conn: _Connection) -> None:
        """Hand ``conn`` to a worker once its request head is in; until then park it (no thread held)."""
        state = conn.advance()
        if state == READY:
            conn.head_deadline = None
            super().process_conn(conn)
        elif state == WAIT and self.ready:
            self._connections.wait(conn)
        else:
            conn.close()


def run_until_signalled(server: Server, *, name: str, bind: str, port: int, start: Callable[[], None],
                        stop: Callable[[], None], started: Callable[[], None],
                        broken: Callable[[], str | None] = lambda: None) -> None:
    """Bind (a busy port fails before ``start`` starts any child process), ``start``, serve in a thread until
    SIGTERM/SIGINT, the server thread's end or ``broken()`` saying why; then stop the server and ``stop``.
    Shared by docket-registry and docket agent. Raises ServiceUnavailable when it ended for ``broken``'s reason."""
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        done.set()

    try:
        server.prepare()
    except OSError as exc:  # nothing started yet: nothing to stop
        raise DocketError(f"cannot listen on {bind}:{port}: {exc.strerror or exc}",
                          "choose another port or stop what is using it") from exc
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    thread: threading.Thread | None = None
    failed = None
    try:
        start()
        thread = threading.Thread(target=server.serve, name="http", daemon=True)
        thread.start()
        started()
        while not done.wait(0.5):
            if not thread.is_alive():
                log.error("HTTP server stopped unexpectedly")
                break
            failed = broken()
            if failed:
                log.error("%s stopping: %s", name, failed)
                break
    finally:
        server.stop()
        if thread is not None:
            thread.join(timeout=15)
        stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        log.info("%s stopped", name)
    if failed:
        raise ServiceUnavailable(f"{name} stopped: {failed}")
