"""The tracker as a pull sees it: is it reachable at all, and does anybody still need what we seed.

``SeedPolicy`` decides when a finished blob's seeding stops; ``TrackerView`` scrapes (tests pass a ``scraper``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import requests

from docket import errors
from docket.deadline import DeadlineSession
from docket.torrent.metainfo import TorrentMeta
from docket.torrent.tracker import scrape

log = logging.getLogger(__name__)

TRACKER_DEADLINE = 5.0  # a whole scrape of the tracker (connect and each read: 2 s)


class TrackerView:
    """Scrapes of the tracker (its own session: no registry token goes to the tracker)."""

    def __init__(self, scraper: Callable[[str, str], Any] | None = None) -> None:
        self._scraper = scraper
        self._http: DeadlineSession | None = None

    def scrape(self, announce: str, info_hash: str) -> Any:
        if self._scraper is not None:
            return self._scraper(announce, info_hash)
        if self._http is None:
            self._http = DeadlineSession(TRACKER_DEADLINE)
        return scrape(announce, info_hash, timeout=2.0, session=self._http)

    def unreachable(self, announce: str, info_hash: str) -> str | None:
        """Why the tracker cannot be reached at all (connection refused, timeout, ...), else None.

        One scrape: any HTTP answer, even an error, means it is reachable and BitTorrent gets its chance.
        """
        try:
            self.scrape(announce, info_hash)
        except errors.ServiceUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, requests.exceptions.RequestException):
                text = str(cause)
                if isinstance(cause, requests.exceptions.Timeout):
                    return "timed out"
                if "refused" in text.lower():
                    return "connection refused"
                if "resolve" in text.lower() or "Name or service" in text:
                    return "host name not resolved"
                return "cannot connect"
        except Exception as exc:  # noqa: BLE001 - unknown is not "down": BitTorrent gets its chance
            log.debug("tracker probe of %s: %s", announce, exc)
        return None


class SeedPolicy:
    """Seed until ``seed_time`` after completion, or earlier once the tracker's scrape shows, twice in a row, no
    incomplete peer at all (ourselves included: the seeder that replaces our finished download announces our
    address and port as complete at once, see CtorrentProcess.reseed).

    Before that replacement the scrape lagged (ctorrent announces "completed" only at its next regular announce),
    so across hosts a pull seeded the whole ``seed_time``. An earlier rule also stopped when our ctorrent had no
    downloading peer connected; in the swarm benchmark it fired on finished peers while stragglers still needed
    them (all pulls gone at 28-29 s, the last host done at 21.6-22.3 s instead of 14.5-14.8 s: benchmarks/README.md,
    tuning runs C and D), so it was removed. So was counting one incomplete peer as "probably us" for 20 s after
    completion: with one straggler left, every finished peer took the straggler for itself and left (all pulls
    gone at 29.7 s, the straggler done at 23.4 s instead of ~14.5 s: benchmarks/README.md, run 3).
    """

    def __init__(self, tracker: TrackerView, meta: TorrentMeta, completed_at: float, seed_time: float,
                 scrape_interval: float) -> None:
        self.tracker = tracker
        self.meta = meta
        self.deadline = completed_at + seed_time
        self.scrape_interval = scrape_interval
        self.zero_polls = 0
        self.next_scrape = 0.0
        self.completed_at = completed_at

    def done(self) -> bool:
        now = time.monotonic()
        if now >= self.deadline:
            return True
        if now >= self.next_scrape:
            self.next_scrape = now + self.scrape_interval
            try:
                res = self.tracker.scrape(self.meta.announce, self.meta.info_hash)
                log.debug("scrape %s: complete=%s incomplete=%s", self.meta.info_hash, res.complete, res.incomplete)
                self.zero_polls = self.zero_polls + 1 if res.incomplete <= 0 else 0
            except Exception as exc:  # noqa: BLE001 - unknown is not "nobody"
                log.debug("scrape failed: %s", exc)
                self.zero_polls = 0
        return self.zero_polls >= 2
