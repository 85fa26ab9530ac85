"""One bandwidth budget per process: the split (pure), rate parsing, the token bucket, and the CTCS server spoken to
by a client socket that talks as Debian's ctorrent does (lines checked against ctorrent dnh3.3.2 -S)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import click
import pytest

from docket.clicktypes import ByteRate
from docket.torrent.bandwidth import MIN_LIMIT, Budget, RateLimits, TokenBucket, demand, share
from docket.torrent.ctcs import CtcsServer
from docket.torrent.ctorrent_engine import CtorrentEngine
from docket.torrent.ratelimit import HostRates
from tests.support.procs import wait_until


def test_share_splits_evenly_and_never_exceeds_the_budget():
    assert share(3_000_000, [None, None, None]) == [1_000_000] * 3
    assert share(2_000_000, []) == []
    for demands in ([None], [0, None], [0, 0, 0], [50_000, None, 900_000], [10**9, None]):
        assert sum(share(2_000_000, demands)) <= 2_000_000


def test_share_gives_an_idle_share_to_the_busy_ones():
    idle, busy1, busy2 = share(2_000_000, [0, None, None])
    assert idle == 2_000_000 // 24  # the floor: budget / (8 n), room for it to start
    assert busy1 == busy2 == (2_000_000 - idle) // 2
    small, big = share(2_000_000, [300_000, None])
    assert (small, big) == (300_000, 1_700_000)
    assert share(2_000_000, [0, 0]) == [1_000_000, 1_000_000]  # nobody busy: spread over all
    assert min(share(10_000, [0] * 50)) == MIN_LIMIT  # never 0 (ctorrent's "unlimited")


def test_demand_marks_a_participant_using_its_limit_hungry():
    assert demand(500, 1000) is None and demand(100, None) is None
    assert demand(900, 1000) is None and demand(400, 1000) == 600


def test_byte_rate_needs_a_unit():
    rate = ByteRate()
    assert rate.convert("2MB", None, None) == 2_000_000
    assert rate.convert("500KiB", None, None) == 512_000
    assert rate.convert("1.5MB/s", None, None) == 1_500_000
    assert rate.convert("800kb/s", None, None) == 800_000
    with pytest.raises(click.BadParameter, match="give a unit, e.g. 500KB"):
        rate.convert("500", None, None)
    for bad in ("2M", "fast", "-1MB", "2 MiBps", "100B"):
        with pytest.raises(click.BadParameter):
            rate.convert(bad, None, None)


class Fake:
    def __init__(self, rate: float | None) -> None:
        self.r, self.limits = rate, {}

    def rate(self, direction: str) -> float | None:
        return self.r

    def set_limit(self, direction: str, limit: int) -> None:
        self.limits[direction] = limit


def test_budget_rebalances_on_join_leave_and_use():
    budget = Budget(RateLimits(upload=1_000_000))
    a, b = Fake(None), Fake(None)
    budget.join(a)
    assert a.limits == {"upload": 1_000_000}  # no download budget: no download limit set
    budget.join(b)
    assert a.limits["upload"] == b.limits["upload"] == 500_000
    a.r, b.r = 0.0, 300_000.0  # a idles, b uses (more than half) its share
    budget.rebalance()
    assert a.limits["upload"] == 62_500 and b.limits["upload"] == 937_500
    budget.leave(a)
    assert b.limits["upload"] == 1_000_000


def test_token_bucket_holds_its_rate():
    bucket = TokenBucket(1_000_000, burst=0.0)
    started = time.monotonic()
    for _ in range(10):
        bucket.take(40_000)
    assert time.monotonic() - started >= 0.35  # 400 kB at 1 MB/s, less the first chunk's wait


class CtorrentLike:
    """A client socket saying what ctorrent -S says, reading what the server sends."""

    def __init__(self, server: CtcsServer, name: str) -> None:
        self.sock = socket.create_connection(server.address, timeout=5)
        self.sock.sendall(f"PROTOCOL 0003\nCTORRENT -CD0303-xyz 1796104961 1796104961 {name}\n".encode())
        self.buf = b""

    def lines(self, until: str, timeout: float = 5.0) -> list[str]:
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while not any(line.startswith(until) for line in got):
            assert time.monotonic() < deadline, f"no {until!r} in {got}"
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            chunk = self.sock.recv(4096)
            assert chunk, f"server closed; had {got}"
            self.buf += chunk
            *done, self.buf = self.buf.split(b"\n")
            got += [d.decode() for d in done]
        return got

    def last_limit(self, until: str) -> int:
        return int([line for line in self.lines(until) if line.startswith(until)][-1].split()[1])


def test_ctcs_server_splits_the_budget_among_connected_ctorrents():
    budget = Budget(RateLimits(upload=2_000_000, download=1_000_000), tick=3600)
    with CtcsServer(budget) as server:
        one = CtorrentLike(server, "a.torrent")
        first = one.lines("SETDLIMIT")
        assert first[0] == "PROTOCOL 0003" and "SETULIMIT 2000000" in first and "SETDLIMIT 1000000" in first
        two = CtorrentLike(server, "b.torrent")
        assert two.last_limit("SETULIMIT") == 1_000_000 and one.last_limit("SETULIMIT") == 1_000_000
        wait_until(lambda: {c.torrent for c in server.clients()} == {"a.torrent", "b.torrent"}, timeout=5,
                   what="both clients known")
        # ctorrent's status answer: seeds/leechers, pieces, dl,ul rates, totals, limits (bytes/s), cache
        one.sock.sendall(b"CTSTATUS 0:1/0:1/0 10/10/10 0,990000 0,5000000 1000000,1000000 0\n")
        two.sock.sendall(b"CTBW 0,0 500000,1000000\n")
        wait_until(lambda: [c.rates.get("upload") for c in server.clients()].count(990_000.0) == 1, timeout=5,
                   what="rates read")
        budget.rebalance()
        assert one.last_limit("SETULIMIT") > 1_500_000  # it uses its share, the other idles
        two.sock.close()
        wait_until(lambda: len(server.clients()) == 1, timeout=5, what="the closed client dropped")
        assert one.last_limit("SETULIMIT") == 2_000_000
        one.sock.close()


def test_engine_starts_ctorrents_in_the_budget(tmp_path: Path):
    made: list[dict] = []

    class Made:
        def __init__(self, **kw) -> None:
            made.append(kw)

        def start(self) -> None:
            pass

    rates = HostRates(RateLimits(download=3 * 1024 * 1024))
    try:
        engine = CtorrentEngine(process_factory=lambda **kw: Made(**kw), rates=rates)
        engine.download(tmp_path / "t.torrent", tmp_path / "blob", workdir=tmp_path)
        flags = made[0]["extra_args"]
        assert flags[0] == "-S" and flags[1].startswith("127.0.0.1:") and flags[2:] == ["-D", "3072"]
        CtorrentEngine(process_factory=lambda **kw: Made(**kw)).download(tmp_path / "t.torrent", tmp_path / "b",
                                                                        workdir=tmp_path)
        assert "extra_args" not in made[1]  # no budget: no flags
    finally:
        rates.close()


def test_boost_follows_the_measured_total():
    from docket.torrent.bandwidth import BOOST, corrected

    assert corrected(1.0, 1_000_000, 800_000, hungry=True) == pytest.approx(1.1)  # caps not reached: raise them
    assert corrected(1.2, 1_000_000, 1_100_000, hungry=True) == pytest.approx(1.14)  # above the budget: lower
    assert corrected(1.2, 1_000_000, 100_000, hungry=False) == pytest.approx(1.1)  # idle: back towards 1
    assert corrected(1.45, 1_000_000, 0, hungry=True) == BOOST[1]
