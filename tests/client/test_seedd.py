"""The background seeder's logic (seedd.py, background.py) with a stand-in engine and tracker: no processes.

The real thing (detached process, real ctorrents, real tracker) is in tests/e2e/test_background_seeding.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from docket.client import background
from docket.client.background import Handoff, SeederFiles, SeedRequest
from docket.client.seedd import SeedDaemon
from docket.client.seeding import TrackerView
from docket.reference import parse_reference
from docket.torrent.metainfo import build_torrent
from docket.torrent.tracker import ScrapeResult
from tests.support.fakes import FakeSeedEngine, FakeCtorrent, make_puller
from tests.support.procs import wait_until

REF = parse_reference("team/app:v1")


def _blob(loc: Path, data: bytes = b"x" * 100_000) -> SeedRequest:
    hexd = hashlib.sha256(data).hexdigest()
    blob = loc / "blobs" / hexd
    work = loc / "torrents" / hexd
    blob.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    build_torrent(blob, "http://127.0.0.1:1/announce", out=work / f"{hexd}.torrent")
    return SeedRequest(digest=f"sha256:{hexd}", torrent=str(work / f"{hexd}.torrent"), blob=str(blob),
                       workdir=str(work), deadline=time.time() + 60, listen_ip="127.0.0.9", port=2700,
                       size=len(data), ref=str(REF))


def _daemon(loc: Path, counts: list[int]) -> tuple[SeedDaemon, FakeSeedEngine]:
    """A daemon whose tracker reports ``counts[0]`` incomplete peers (a test changes it)."""
    engine = FakeSeedEngine()
    tracker = TrackerView(lambda url, ih: ScrapeResult(1, counts[0], 0))
    daemon = SeedDaemon(SeederFiles(loc), engine=engine, tracker=tracker, scrape_interval=0.05)
    assert daemon.take_lock()
    return daemon, engine


def _run(daemon: SeedDaemon) -> threading.Thread:
    t = threading.Thread(target=daemon.run, daemon=True)
    t.start()
    return t


def test_a_handed_over_blob_is_seeded_on_its_port_until_nobody_needs_it(tmp_path: Path):
    loc = tmp_path / "loc"
    counts = [2]  # two peers still download
    daemon, engine = _daemon(loc, counts)
    files = SeederFiles(loc)
    assert files.running() and files.daemon_pid() is None  # our own pid, not a seedd command line
    req = _blob(loc)
    files.post({"op": "seed", **req.__dict__})
    thread = _run(daemon)
    wait_until(lambda: engine.seeds, timeout=5, what="the seeder to start")
    seed = engine.seeds[0]
    assert seed.kw["port"] == 2700 and seed.kw["listen_ip"] == "127.0.0.9"
    assert seed.kw["workdir"] == Path(req.workdir) and seed.kw["log_path"] == Path(req.workdir) / "seed.log"
    wait_until(lambda: files.read_state()["blobs"], timeout=5, what="the state file")
    state = files.read_state()
    assert state["running"] and state["blobs"][0]["digest"] == req.digest
    assert state["blobs"][0]["peer"] == "127.0.0.9:2700" and 50 < state["blobs"][0]["seconds_left"] <= 60
    time.sleep(0.5)
    assert not seed.stopped, "stopped while the tracker still counts downloaders"
    counts[0] = 0
    thread.join(10)
    assert not thread.is_alive() and seed.stopped  # nothing left to seed: it ended by itself
    assert not files.running() and not files.state.exists()


def test_bad_requests_are_refused_and_removed(tmp_path: Path):
    loc = tmp_path / "loc"
    daemon, engine = _daemon(loc, [1])
    files = SeederFiles(loc)
    req = _blob(loc)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(req.blob, outside / "blob")
    files.post({"op": "seed", **{**req.__dict__, "blob": str(outside / "blob")}})  # a file outside the location
    files.post({"op": "seed", **{**req.__dict__, "digest": "sha256:../../etc"}})
    files.post({"op": "format-disk"})
    (files.inbox / "9-big.json").write_bytes(b"{" + b" " * 70_000 + b"}")
    (files.inbox / "9-bad.json").write_bytes(b"not json")
    daemon._take_requests()
    assert engine.seeds == [] and daemon.seeding == {}
    assert [p for p in files.inbox.iterdir()] == []
    os.close(daemon._lock_fd)  # type: ignore[arg-type]


def test_drop_stops_a_blob_and_a_later_request_extends_its_deadline(tmp_path: Path):
    loc = tmp_path / "loc"
    daemon, engine = _daemon(loc, [1])
    files = SeederFiles(loc)
    req = _blob(loc)
    files.post({"op": "seed", **req.__dict__})
    daemon._take_requests()
    first = daemon.seeding[req.digest].policy.deadline
    files.post({"op": "seed", **{**req.__dict__, "deadline": req.deadline + 100}})
    daemon._take_requests()
    assert len(engine.seeds) == 1 and daemon.seeding[req.digest].policy.deadline > first + 90
    files.post({"op": "drop", "digests": [req.digest]})
    daemon._take_requests()
    assert daemon.seeding == {}
    wait_until(lambda: engine.seeds[0].stopped, timeout=5, what="the dropped seeder to stop")
    os.close(daemon._lock_fd)  # type: ignore[arg-type]


def test_the_seeder_ends_at_the_deadline_and_when_its_location_is_removed(tmp_path: Path):
    loc = tmp_path / "loc"
    daemon, engine = _daemon(loc, [3])
    files = SeederFiles(loc)
    short = _blob(loc, b"a" * 50_000)
    files.post({"op": "seed", **{**short.__dict__, "deadline": time.time() + 0.5}})
    files.post({"op": "seed", **_blob(loc, b"b" * 50_000).__dict__})
    thread = _run(daemon)
    wait_until(lambda: len(engine.seeds) == 2, timeout=5, what="both seeders")
    wait_until(lambda: engine.seeds[0].stopped, timeout=5, what="the seeder whose deadline passed")
    assert not engine.seeds[1].stopped
    shutil.rmtree(loc)  # `rm -rf ~/.cache/docket`
    thread.join(5)
    assert not thread.is_alive() and engine.seeds[1].stopped


def test_a_pull_hands_its_finished_blob_over_and_returns(served, tmp_path: Path, monkeypatch):
    """The pull halts its finished download and posts it (same port) to the seeder; it starts one when none runs;
    --json says "background"; nothing seeds in the pull itself."""
    canned, data, digest = served
    spawned: list[Path] = []
    monkeypatch.setattr(background, "spawn", lambda files, rate=None: spawned.append(files.location))
    loc = tmp_path / "loc"
    counts = [1]
    daemon, engine = _daemon(loc, counts)  # in this process: the pull finds it running (its lock is held)
    thread = _run(daemon)
    try:
        puller = make_puller(canned, tmp_path, data, load=False, seed_time=30, handoff=Handoff(loc))
        res = puller.pull(REF)
        assert res.extra["seeding"] == "background"
        assert FakeCtorrent.instances[-1].stopped  # the download was stopped, not left seeding in the pull
        assert spawned == []  # one was running
        assert engine.seeds and engine.seeds[0].kw["blob"].name == digest.split(":")[1]
        assert os.getpid() in daemon.attached
    finally:
        counts[0] = 0
        daemon.term.set()
        thread.join(10)


def test_a_failed_pull_withdraws_what_it_handed_over(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(background, "spawn", lambda files, rate=None: None)
    loc = tmp_path / "loc"
    handoff = Handoff(loc)
    req = _blob(loc)
    handoff.attach()
    handoff.seed(req)
    handoff.withdraw()
    requests = [json.loads(p.read_text()) for p in sorted(SeederFiles(loc).inbox.iterdir())]
    assert [r["op"] for r in requests] == ["attach", "seed", "drop"]
    assert requests[0]["pid"] == os.getpid() and requests[2]["digests"] == [req.digest]
    assert handoff.settle(timeout=0.3) is False  # no seeder took them: removed, reported
    assert list(SeederFiles(loc).inbox.iterdir())[-1].name.endswith("drop.json")  # the drop stays for the next


@pytest.mark.parametrize("seed_time, expected", [(0, "none"), (2, "foreground")])
def test_without_a_handoff_the_pull_seeds_itself(served, tmp_path: Path, seed_time: float, expected: str):
    canned, data, _ = served
    from docket.torrent.tracker import ScrapeResult as S

    res = make_puller(canned, tmp_path, data, load=False, seed_time=seed_time, scrapes=[S(1, 0, 0)] * 100).pull(REF)
    assert res.extra["seeding"] == expected
