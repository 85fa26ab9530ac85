"""One bandwidth budget per process, over all its transfers (``--max-upload-rate``, ``--max-download-rate``).

A per-transfer cap (ctorrent's -U/-D) lets three layers move at three times the limit. Here every transfer of the
process is a *participant* of one ``Budget`` per direction: ctorrents through the CTCS control protocol (ctcs.py),
libtorrent sessions through their rate settings, HTTP fetches through a token bucket (``TokenBucket``). Once a
``TICK`` the budget reads each participant's rate and hands out limits whose sum is the budget (``share``): a
participant that uses less than its limit keeps a little above what it uses, the rest is split evenly among the
ones that use theirs. So the sum of the caps never exceeds the budget, and an idle transfer gives its share away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

TICK = 1.0  # seconds between rebalances
USED = 0.5  # a participant moving at >= USED * its limit wants more ("hungry"): ctorrent keeps well below its cap
HEADROOM = 1.5  # a participant below that keeps HEADROOM x its rate (room to grow until the next tick)
MIN_LIMIT = 1024  # bytes/s: no participant is capped lower (ctorrent and libtorrent read 0 as "unlimited")
# The caps handed out sum to budget x boost, the boost corrected each tick by how far the measured total is from
# the budget (GAIN x the error, within BOOST): ctorrent keeps 10-20 % below its cap (measured in the swarm
# benchmark), so caps summing to the budget alone leave the link that far below it.
GAIN = 0.5
BOOST = (0.8, 1.5)


@dataclass(frozen=True)
class RateLimits:
    """Bytes per second for the whole process; None: unlimited."""

    upload: int | None = None
    download: int | None = None

    def __bool__(self) -> bool:
        return bool(self.upload or self.download)


def share(budget: int, demands: Sequence[float | None]) -> list[int]:
    """Split ``budget`` among participants (water-filling). ``demands[i]``: what participant i would use (None:
    as much as it gets). The ones asking less than an even share get what they ask (at least ``budget / (8n)``,
    so an idle one can start), the others split the rest evenly; what nobody takes is spread evenly over all.
    The result sums to ``budget`` (up to rounding down), each at least MIN_LIMIT."""
    n = len(demands)
    if n == 0:
        return []
    floor = max(MIN_LIMIT, budget / (8 * n))
    want = [None if d is None else max(floor, d) for d in demands]
    limits: list[float] = [0.0] * n
    open_ = list(range(n))
    left = float(budget)
    while open_:  # give every modest demand what it asks, smallest first, while it is below the even share
        even = left / len(open_)
        small = [i for i in open_ if want[i] is not None and want[i] <= even]  # type: ignore[operator]
        if not small:
            break
        for i in small:
            limits[i] = want[i]  # type: ignore[assignment]
            left -= limits[i]
            open_.remove(i)
    if open_:
        for i in open_:
            limits[i] = left / len(open_)
    elif left > 0:  # nobody is hungry: the rest spread over all, so a burst finds room
        for i in range(n):
            limits[i] += left / n
    return [max(MIN_LIMIT, int(x)) for x in limits]


def corrected(boost: float, budget: int, total: float, hungry: bool) -> float:
    """The next boost: up while someone wants more and the measured ``total`` is below the budget, down while it
    is above; back towards 1 when nobody wants more."""
    if hungry or total > budget:
        boost *= 1 + GAIN * (budget - total) / budget
    else:
        boost += (1.0 - boost) * GAIN
    return min(BOOST[1], max(BOOST[0], boost))


def demand(rate: float, limit: int | None) -> float | None:
    """What a participant moving at ``rate`` under ``limit`` is taken to want: None (more) when it uses its
    limit (or has none yet), else HEADROOM x its rate."""
    if limit is None or rate >= USED * limit:
        return None
    return rate * HEADROOM


class Participant(Protocol):
    """One limited thing: a ctorrent, a libtorrent session, a token bucket."""

    def rate(self, direction: str) -> float | None:
        """Bytes/s it moved lately in ``direction`` ("upload" or "download"); None: not known yet."""

    def set_limit(self, direction: str, limit: int) -> None:
        """Cap it at ``limit`` bytes/s."""


class Budget:
    """The participants of one process and its limits; ``rebalance`` once a TICK (a thread, ``start``)."""

    def __init__(self, limits: RateLimits, tick: float = TICK) -> None:
        self.limits = limits
        self.tick = tick
        # id -> (participant, the directions it takes part in, the limits given to it)
        self._parts: dict[int, tuple[Participant, tuple[str, ...], dict[str, int]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.boost = {"upload": 1.0, "download": 1.0}

    def directions(self) -> list[tuple[str, int]]:
        return [(d, b) for d, b in (("upload", self.limits.upload), ("download", self.limits.download)) if b]

    def join(self, part: Participant, directions: tuple[str, ...] = ("upload", "download")) -> None:
        """A new participant: the budgets are split again at once."""
        with self._lock:
            self._parts[id(part)] = (part, directions, {})
        self.rebalance()

    def leave(self, part: Participant) -> None:
        with self._lock:
            self._parts.pop(id(part), None)
        self.rebalance()

    def initial(self, direction: str) -> int | None:
        """The limit a participant about to join starts with (its even share), or None: no limit that way."""
        budget = dict(self.directions()).get(direction)
        if not budget:
            return None
        with self._lock:
            n = len(self._parts) + 1
        return max(MIN_LIMIT, budget // n)

    def rebalance(self, measure: bool = False) -> None:
        """``measure``: a tick (the rates are one TICK apart): correct the boost by the measured total."""
        with self._lock:
            parts = list(self._parts.values())
            for direction, budget in self.directions():
                members = [(part, given) for part, dirs, given in parts if direction in dirs]
                demands, total = [], 0.0
                for part, given in members:
                    try:
                        rate = part.rate(direction)
                    except Exception:  # noqa: BLE001 - one broken participant must not stop the others
                        rate = None
                    total += rate or 0.0
                    demands.append(None if rate is None else demand(rate, given.get(direction)))
                if measure and members:
                    hungry = any(d is None for d in demands)
                    self.boost[direction] = corrected(self.boost[direction], budget, total, hungry)
                limits = share(int(budget * self.boost[direction]), demands)
                log.debug("bandwidth %s: total %d, demands %s, boost %.2f -> limits %s", direction, total,
                          ["more" if d is None else int(d) for d in demands], self.boost[direction], limits)
                for (part, given), limit in zip(members, limits):
                    old = given.get(direction)
                    if old is not None and abs(limit - old) <= 0.02 * old:
                        continue
                    given[direction] = limit
                    try:
                        part.set_limit(direction, limit)
                    except Exception:  # noqa: BLE001
                        log.debug("cannot set a %s limit on %r", direction, part, exc_info=True)

    def start(self) -> Budget:
        if self._thread is None and self.limits:
            self._thread = threading.Thread(target=self._run, name="bandwidth", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.tick):
            self.rebalance(measure=True)

    def close(self) -> None:
        self._stop.set()


class TokenBucket:
    """A participant for transfers we move ourselves (HTTP): ``take(n)`` blocks until ``n`` bytes may go. Its
    rate is set by the budget; one bucket is shared by every HTTP transfer of the process."""

    def __init__(self, rate: int, burst: float = 0.25) -> None:
        self._rate = float(rate)
        self._burst = burst  # seconds of rate that may go at once
        self._tokens = 0.0
        self._at = time.monotonic()
        self._moved = 0
        self._window = (time.monotonic(), 0)
        self._lock = threading.Lock()

    def set_limit(self, direction: str, limit: int) -> None:
        with self._lock:
            self._refill()
            self._rate = float(limit)

    def rate(self, direction: str) -> float | None:
        with self._lock:
            now = time.monotonic()
            since, moved = self._window
            self._window = (now, self._moved)
            return (self._moved - moved) / max(now - since, 1e-3)

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._rate * self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now

    def take(self, n: int) -> None:
        with self._lock:
            self._moved += n
            self._refill()
            self._tokens -= n
            wait = -self._tokens / self._rate if self._tokens < 0 else 0.0
        if wait > 0:
            time.sleep(wait)
