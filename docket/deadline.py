"""Whole-request deadlines for ``requests``: a server that trickles one byte a second cannot hold a pull.

``requests`` only has a timeout per socket read, so a reply that sends a byte before each read timeout (headers,
a body) never ends. Here every request made through a ``DeadlineSession`` gets a ``Watch``: the connections it
takes from urllib3's pool are remembered, and one watchdog thread (for the whole process) shuts their sockets
down when the watch's deadline passes; the blocked read then fails at once and the caller sees
``DeadlineExceeded`` (a ``requests`` Timeout). A connection given back to the pool leaves its watch first, so a
late deadline never touches the next request on the same connection.

Two kinds of deadline (README, "Limits against a broken or hostile registry or tracker"):
- small replies (records, torrents, the config, tracker scrapes): a fixed total, ``Watch(seconds)``;
- blob downloads: a deadline on progress: the caller calls ``Watch.extend(seconds)`` after each chunk, so a
  download of any size goes on while chunks keep arriving in time, and a trickle ends within one window.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import socket
import threading
import time
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

log = logging.getLogger(__name__)
_current = threading.local()


class DeadlineExceeded(requests.exceptions.Timeout):
    """The whole request (or one progress window of a download) took longer than its deadline."""


class Watch:
    """One request's deadline and the pooled connections it is using right now."""

    __slots__ = ("seconds", "deadline", "expired", "_conns", "_lock")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.expired = False
        self._conns: set[Any] = set()
        self._lock = threading.Lock()

    def extend(self, seconds: float | None = None) -> None:
        """Move the deadline to ``seconds`` (default: the watch's own) from now: progress was made."""
        self.deadline = time.monotonic() + (self.seconds if seconds is None else seconds)

    def add(self, conn: Any) -> None:
        with self._lock:
            self._conns.add(conn)
            expired = self.expired
        if expired:
            _shutdown(conn)

    def discard(self, conn: Any) -> None:
        with self._lock:
            self._conns.discard(conn)

    def expire(self) -> None:
        """Shut down every socket of this request: a read blocked in any thread returns at once."""
        with self._lock:
            self.expired = True
            conns = list(self._conns)
        for conn in conns:
            _shutdown(conn)

    def __enter__(self) -> Watch:
        _WATCHDOG.add(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.deadline = 0.0
        with self._lock:
            self._conns.clear()


def _shutdown(conn: Any) -> None:
    # conn.sock is None while a reply without a length (or an HTTP/1.0 one) is read: http.client gave the socket
    # to the response. The sockets the connection remembered at connect time still reach it (shutdown works on a
    # socket whose close() makefile references deferred); the raw one covers a TLS handshake still running.
    for sock in (getattr(conn, "sock", None), *getattr(conn, "_docket_socks", ())):
        if sock is None:
            continue
        try:
            # socket.socket's own method: SSLSocket.shutdown would also drop its SSL object under a reading thread
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except (OSError, TypeError, ValueError):
            pass


class _RememberSocket:
    """urllib3 connection hooks: keep the sockets a connection opened, for ``_shutdown`` (see there)."""

    _docket_socks: tuple[socket.socket, ...] = ()

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        self._docket_socks = (sock,)
        return sock

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        sock = getattr(self, "sock", None)
        if sock is not None:
            self._docket_socks = (*self._docket_socks, sock)


class _HTTPConn(_RememberSocket, HTTPConnection):
    pass


class _HTTPSConn(_RememberSocket, HTTPSConnection):
    pass


class _Watchdog:
    """One thread for the whole process, started at the first request; a heap of deadlines."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watch]] = []
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def add(self, watch: Watch) -> None:
        with self._cond:
            heapq.heappush(self._heap, (watch.deadline, next(self._seq), watch))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="http-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                when, _, watch = self._heap[0]
                now = time.monotonic()
                if when > now:
                    self._cond.wait(when - now)
                    continue
                heapq.heappop(self._heap)
                if watch.deadline == 0.0:  # finished
                    continue
                if watch.deadline > now:  # extended since it was queued
                    heapq.heappush(self._heap, (watch.deadline, next(self._seq), watch))
                    continue
            log.info("request deadline of %g s passed: closing its connection", watch.seconds)
            watch.expire()


_WATCHDOG = _Watchdog()


class _WatchedPool:
    """urllib3 pool hooks: a connection taken during a watched request belongs to its watch until given back."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        watch = getattr(_current, "watch", None)
        conn._docket_watch = watch
        if watch is not None:
            watch.add(conn)
        return conn

    def _put_conn(self, conn: Any) -> None:
        watch = getattr(conn, "_docket_watch", None)
        if watch is not None:
            watch.discard(conn)
            conn._docket_watch = None
        super()._put_conn(conn)  # type: ignore[misc]


class _HTTPPool(_WatchedPool, HTTPConnectionPool):
    ConnectionCls = _HTTPConn


class _HTTPSPool(_WatchedPool, HTTPSConnectionPool):
    ConnectionCls = _HTTPSConn


_POOLS = {"http": _HTTPPool, "https": _HTTPSPool}


class _DeadlineAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = dict(_POOLS)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = dict(_POOLS)
        return manager


class DeadlineSession(requests.Session):
    """A Session whose every request ends by ``total`` seconds (or the ``deadline=`` given to it).

    With ``stream=True`` the deadline keeps covering the body until the response is closed; the response carries
    its ``watch`` (``resp.watch``) so a downloader can ``extend`` it on progress and check ``expired`` after a read
    that ended early (a connection shut down mid-body can look like a short body).
    """

    def __init__(self, total: float) -> None:
        super().__init__()
        self.total = total
        adapter = _DeadlineAdapter()
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def request(self, method: str | bytes, url: str | bytes, *args: Any, deadline: float | None = None,
                **kwargs: Any) -> requests.Response:
        watch = Watch(self.total if deadline is None else deadline).__enter__()
        previous = getattr(_current, "watch", None)
        _current.watch = watch
        try:
            resp = super().request(method, url, *args, **kwargs)
        except requests.exceptions.RequestException as exc:
            if watch.expired:
                raise DeadlineExceeded(f"no complete answer within {watch.seconds:g} s") from exc
            raise
        finally:
            _current.watch = previous
        resp.watch = watch  # type: ignore[attr-defined]
        if not kwargs.get("stream"):
            watch.__exit__()  # the body is read: nothing left to watch
        if watch.expired:  # a body read inside request() (stream=False) that the shutdown cut short
            resp.close()
            raise DeadlineExceeded(f"no complete answer within {watch.seconds:g} s")
        return resp


def progress() -> None:
    """The request running in this thread made progress (an upload sent a chunk): push its deadline on."""
    watch = getattr(_current, "watch", None)
    if watch is not None:
        watch.extend()


def extend(resp: requests.Response) -> None:
    """A streamed download made progress: its deadline counts again from now (no-op without a watch)."""
    watch = getattr(resp, "watch", None)
    if watch is not None:
        watch.extend()


def expired(resp: requests.Response) -> bool:
    """True when the response's deadline passed (its body may have been cut short)."""
    watch = getattr(resp, "watch", None)
    return bool(watch is not None and watch.expired)
