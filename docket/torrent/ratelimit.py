"""``HostRates``: what one process of ours (a pull, a background seeder, an agent, a registry) gives its engines so
that all their transfers share one budget per direction (bandwidth.py): ctorrent flags (``-S`` to the process's
CTCS server, ctcs.py, and an even share as a start), libtorrent sessions, and a token bucket for HTTP.

Created by the command line and passed down; an instance with no limits does nothing (no server, no thread).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from typing import Any

from docket.torrent.bandwidth import Budget, RateLimits, TokenBucket
from docket.torrent.ctcs import CtcsServer

log = logging.getLogger(__name__)


class LibtorrentSession:
    """A libtorrent session as a participant: its session-wide rate settings, its torrents' summed rates."""

    def __init__(self, session: Any) -> None:
        self.session = session

    def rate(self, direction: str) -> float | None:
        field = "upload_rate" if direction == "upload" else "download_rate"
        return float(sum(getattr(h.status(), field) for h in self.session.get_torrents()))

    def set_limit(self, direction: str, limit: int) -> None:
        key = "upload_rate_limit" if direction == "upload" else "download_rate_limit"
        self.session.apply_settings({key: int(limit)})


class HostRates:
    """One process's budget (``limits``) and the means to hold every transfer to it."""

    def __init__(self, limits: RateLimits | None = None) -> None:
        self.limits = limits or RateLimits()
        self.budget = Budget(self.limits)
        self._ctcs: CtcsServer | None = None
        self._bucket: TokenBucket | None = None
        self._bucket_users = 0
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.limits)

    def ctorrent_args(self) -> list[str]:
        """Flags for a ctorrent about to start: ``-S`` to our CTCS server (started on first use), and its even
        share now (``-U``/``-D``, KB/s), held until the server's first rebalance."""
        if not self.limits:
            return []
        with self._lock:
            if self._ctcs is None:
                self.budget.start()
                self._ctcs = CtcsServer(self.budget)
                log.info("bandwidth: upload %s, download %s bytes/s for the whole process (CTCS on %s)",
                         self.limits.upload or "unlimited", self.limits.download or "unlimited", self._ctcs.spec)
            args = ["-S", self._ctcs.spec]
        for flag, direction in (("-U", "upload"), ("-D", "download")):
            start = self.budget.initial(direction)
            if start:
                args += [flag, str(max(1, start // 1024))]
        return args

    def libtorrent(self, session: Any) -> None:
        """A libtorrent session of this process joins the budget (for its life: sessions are not closed)."""
        if self.limits:
            self.budget.start()
            self.budget.join(LibtorrentSession(session))

    @contextlib.contextmanager
    def http(self) -> Iterator[TokenBucket | None]:
        """The process's HTTP download bucket for one transfer (None without a download limit); the bucket is in
        the budget while any transfer uses it."""
        if not self.limits.download:
            yield None
            return
        with self._lock:
            if self._bucket is None:
                self._bucket = TokenBucket(self.budget.initial("download") or self.limits.download)
                self.budget.start()
                self.budget.join(self._bucket, ("download",))
            self._bucket_users += 1
            bucket = self._bucket
        try:
            yield bucket
        finally:
            with self._lock:
                self._bucket_users -= 1
                if not self._bucket_users:
                    self._bucket = None
                    self.budget.leave(bucket)

    def close(self) -> None:
        self.budget.close()
        with self._lock:
            if self._ctcs is not None:
                self._ctcs.close()
                self._ctcs = None
