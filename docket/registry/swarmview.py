"""Swarm counts for the web page: the tracker's scrape of each layer, with short timeouts and a few seconds of cache.

A page view must never hang on the tracker: the layers not in the cache are asked with one multi-scrape
(``scrape_many``, 64 a request), each request ending within ``timeout`` and no request started after ``budget``
seconds; a tracker that failed is not asked again for ``ttl`` seconds (the page says "tracker unreachable").
One ``SwarmCounts`` per app.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from docket.deadline import DeadlineSession
from docket.errors import DocketError
from docket.torrent.tracker import ScrapeResult, scrape_many



@dataclass
class SwarmReport:
    """What the page shows: counts by info hash, and why some are missing."""

    counts: dict[str, ScrapeResult] = field(default_factory=dict)
    error: str | None = None  # why the tracker's counts are missing (it did not answer)
    skipped: int = 0  # hashes past the cap, not scraped


class SwarmCounts:
    def __init__(self, announce_url: Callable[[], str], *, ttl: float = 5.0, timeout: float = 1.0,
                 budget: float = 2.5, cap: int = 200) -> None:
        self.announce_url = announce_url
        self.ttl, self.timeout, self.budget, self.cap = ttl, timeout, budget, cap
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, ScrapeResult]] = {}
        self._down: tuple[float, str] | None = None

    def report(self, info_hashes: Iterable[str]) -> SwarmReport:
        hashes = list(dict.fromkeys(info_hashes))
        out = SwarmReport(skipped=max(0, len(hashes) - self.cap))
        hashes = hashes[: self.cap]
        now = time.monotonic()
        with self._lock:
            if self._down is not None and now - self._down[0] < self.ttl:
                out.error = self._down[1]
                return out
            self._cache = {h: v for h, v in self._cache.items() if now - v[0] < self.ttl}
            out.counts = {h: self._cache[h][1] for h in hashes if h in self._cache}
        missing = [h for h in hashes if h not in out.counts]
        if missing:
            self._scrape(missing, out)
        return out

    def _scrape(self, hashes: list[str], out: SwarmReport) -> None:
        url = self.announce_url()
        try:
            with DeadlineSession(self.timeout) as session:
                found = scrape_many(url, hashes, timeout=self.timeout, session=session, budget=self.budget)
        except DocketError as exc:
            out.error, out.counts = _reason(url, exc), {}
        else:
            out.counts.update(found)
        now = time.monotonic()
        with self._lock:
            for h, result in out.counts.items():
                self._cache[h] = (now, result)
            if out.error is not None:
                self._down = (now, out.error)


def _reason(url: str, exc: BaseException) -> str:
    """One short line for the page (the scrape's own message quotes urllib3's whole retry story)."""
    text = exc.message if isinstance(exc, DocketError) else str(exc)
    if "refused" in text.lower():
        return f"{url}: connection refused"
    if "timed out" in text.lower() or "timeout" in text.lower() or "deadline" in text.lower():
        return f"{url}: no answer in time"
    return f"{url}: {text[:160]}"
