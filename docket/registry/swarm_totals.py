"""The swarm in numbers for ``/metrics``: seeds and downloading peers of every stored torrent in total, as the
tracker's scrape reports them.

A scrape of /metrics must stay cheap and must not hang on a dead or slow tracker: the totals are kept for ``ttl``
seconds, fetched with opentracker's multi-scrape (``scrape_many``: 64 info hashes a request, which the private
tracker's guard passes on too), each request ending within ``deadline`` seconds and the whole refresh within ``budget``. A
failed refresh is remembered (as ``up=False``) for ``ttl`` seconds too, so a dead tracker costs one failed
connection per ``ttl``, not one per scrape. One refresh at a time: a scrape arriving meanwhile gets the last
totals.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from docket.deadline import DeadlineSession
from docket.errors import DocketError
from docket.registry.db import Database
from docket.registry.queries import whitelist
from docket.registry.swarm import Swarm
from docket.torrent.tracker import scrape_many

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Totals:
    up: bool  # the tracker answered every scrape of the refresh
    torrents: int = 0  # info hashes asked about
    seeds: int = 0  # peers with the whole blob (our seeders included)
    downloading: int = 0  # peers still downloading
    downloaded: int = 0  # completed downloads the tracker counted (since it started)
    at: float = 0.0  # clock() of the refresh


class SwarmTotals:
    def __init__(self, db: Database, swarm: Swarm, *, ttl: float = 10.0, deadline: float = 2.0,
                 budget: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.db = db
        self.swarm = swarm
        self.ttl = ttl
        self.deadline = deadline
        self.budget = budget
        self._clock = clock
        self._last: Totals | None = None
        self._refreshing = threading.Lock()

    def current(self) -> Totals | None:
        """The totals at most ``ttl`` seconds old; None where the registry runs no swarm (seeding disabled)."""
        if not self.swarm.seeding:
            return None
        last = self._last
        if last is not None and self._clock() - last.at < self.ttl:
            return last
        if not self._refreshing.acquire(blocking=False):
            return last  # another scrape is refreshing: its caller gets the new totals
        try:
            self._last = self._fetch()
            return self._last
        finally:
            self._refreshing.release()

    def _fetch(self) -> Totals:
        with self.db.session() as s:
            hashes = whitelist(s)
        if not hashes:  # nothing to scrape: whether the tracker runs (or answers TCP) is all there is to say
            return Totals(up=self.swarm.tracker.alive(), at=self._clock())
        try:
            with DeadlineSession(self.deadline) as session:
                counts = scrape_many(self.swarm.announce_url, hashes, timeout=self.deadline, session=session,
                                     budget=self.budget).values()
        except DocketError as exc:
            log.warning("metrics: the tracker's counts are unknown: %s", exc.message)
            return Totals(up=False, torrents=len(hashes), at=self._clock())
        return Totals(True, len(hashes), sum(c.complete for c in counts), sum(c.incomplete for c in counts),
                           sum(c.downloaded for c in counts), at=self._clock())
