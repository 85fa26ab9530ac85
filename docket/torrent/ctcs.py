"""A CTorrent Control Server (CTCS) in this process: each ctorrent we start (``-S 127.0.0.1:PORT``) connects to it
and becomes a participant of the process's ``Budget`` (bandwidth.py), which caps it with ``SETULIMIT`` /
``SETDLIMIT`` (bytes/s) as transfers come, go and idle.

The protocol (Enhanced CTorrent dnh3.3.2, "protocol 3"), as the Debian ctorrent speaks it: lines ended by "\\n";
on connect ctorrent sends ``PROTOCOL 0003`` and ``CTORRENT <peer id> <start> <now> <torrent>``; the server
answers ``PROTOCOL 0003``. ``SENDSTATUS`` asks for ``CTSTATUS s:S/l:L/c have/total/avail dlrate,ulrate
dltotal,ultotal dlimit,ulimit cache`` (rates and limits in bytes/s); ``SETULIMIT n`` / ``SETDLIMIT n`` set a limit
and are answered by ``CTBW dlrate,ulrate dlimit,ulimit``. ctorrent ignores SETDLIMIT while it seeds, and reads a
limit of 0 as unlimited (the budget never sends less than MIN_LIMIT). Other messages are ignored.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading
import time
from typing import Any

from docket.torrent.bandwidth import Budget

log = logging.getLogger(__name__)

MIN_SPAN = 0.3  # seconds between two status answers for a rate from their totals
MAX_LINE = 8192  # a longer line without "\n" from a client: it is dropped


class CtcsClient:
    """One connected ctorrent, as a budget participant."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.torrent: str | None = None
        self.rates: dict[str, float] = {}  # "download"/"upload" -> bytes/s, from CTSTATUS or CTBW
        self.limits: dict[str, int] = {}  # what ctorrent says its limits are
        self._buf = b""
        self._last: tuple[float, int, int] | None = None  # (monotonic time, download total, upload total)
        self._send_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CtcsClient({self.torrent!r})"

    def send(self, line: str) -> None:
        with self._send_lock:
            try:
                self.sock.sendall(line.encode() + b"\n")
            except OSError:
                pass  # gone: the server's reader sees EOF and drops it

    # -- participant ------------------------------------------------------------------------------------------
    def rate(self, direction: str) -> float | None:
        self.send("SENDSTATUS")  # the answer arrives before the next tick
        return self.rates.get(direction)

    def set_limit(self, direction: str, limit: int) -> None:
        self.send(f"{'SETULIMIT' if direction == 'upload' else 'SETDLIMIT'} {int(limit)}")

    # -- input ------------------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> bool:
        """Lines from ctorrent; False when the client broke the protocol (too long a line)."""
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > MAX_LINE:
            return False
        for raw in lines:
            self.line(raw.decode("utf-8", "replace").strip())
        return True

    def line(self, line: str) -> None:
        words = line.split()
        if not words:
            return
        kind = words[0]
        try:
            if kind == "CTORRENT" and len(words) >= 5:
                self.torrent = " ".join(words[4:])
            elif kind == "CTSTATUS" and len(words) >= 6:
                self._pairs(words[3], words[5], own_rates=self._last is None)
                self._totals(words[4])
            elif kind == "CTBW" and len(words) >= 3:
                self._pairs(words[1], words[2], own_rates=self._last is None)
        except ValueError:
            log.debug("ctcs: unreadable line %r", line)

    def _totals(self, totals: str) -> None:
        """Rates from the byte totals of two answers in a row: ctorrent's own rates are averaged over many
        seconds (they lag a change by several ticks, and linger after a transfer ended)."""
        now = time.monotonic()
        down, up = (int(x) for x in totals.split(","))
        if self._last is not None:
            at, last_down, last_up = self._last
            if now - at >= MIN_SPAN:
                self.rates = {"download": max(0, down - last_down) / (now - at),
                              "upload": max(0, up - last_up) / (now - at)}
            else:
                return  # too close to the last one for a rate: measured from the older one next time
        self._last = (now, down, up)

    def _pairs(self, rates: str, limits: str, own_rates: bool) -> None:
        """``own_rates``: take ctorrent's averaged rates (until two status answers give a measured one)."""
        down, up = (float(x) for x in rates.split(","))
        dlimit, ulimit = (int(x) for x in limits.split(","))
        if own_rates:
            self.rates = {"download": down, "upload": up}
        self.limits = {"download": dlimit, "upload": ulimit}


class CtcsServer:
    """Listens on 127.0.0.1 (a free port) in one thread; every client joins ``budget`` until it disconnects."""

    def __init__(self, budget: Budget, host: str = "127.0.0.1") -> None:
        self.budget = budget
        self._listener = socket.create_server((host, 0))
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ, None)
        self._clients: dict[socket.socket, CtcsClient] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ctcs", daemon=True)
        self._thread.start()

    @property
    def spec(self) -> str:
        """ctorrent's -S argument."""
        return f"{self.address[0]}:{self.address[1]}"

    def clients(self) -> list[CtcsClient]:
        return list(self._clients.values())

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.5):
                if key.data is None:
                    self._accept()
                else:
                    self._read(key.fileobj, key.data)  # type: ignore[arg-type]

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError:
            return
        sock.setblocking(True)
        sock.settimeout(2.0)  # a send to a stuck ctorrent gives up instead of holding the budget's lock
        client = CtcsClient(sock)
        self._clients[sock] = client
        self._selector.register(sock, selectors.EVENT_READ, client)
        client.send("PROTOCOL 0003")
        self.budget.join(client)

    def _read(self, sock: socket.socket, client: CtcsClient) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, socket.timeout):
            return
        except OSError:
            data = b""
        if data and client.feed(data):
            return
        self._drop(sock, client)

    def _drop(self, sock: socket.socket, client: CtcsClient) -> None:
        self._selector.unregister(sock)
        self._clients.pop(sock, None)
        sock.close()
        self.budget.leave(client)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        for sock, client in list(self._clients.items()):
            self._drop(sock, client)
        self._selector.close()
        self._listener.close()

    def __enter__(self) -> CtcsServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
