"""The agent's seeder: ``SeedDaemon(keep=True)`` (client/seedd.py) with a stand-in engine, no processes. An agent
seeds what it holds for as long as it holds it: no idle end, no deadline, a ctorrent that exits is started again,
and only a drop (eviction) or a vanished file stops a blob."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from docket.client import seedd
from docket.client.background import SeederFiles, SeedRequest
from docket.client.seedd import SeedDaemon
from docket.client.seeding import TrackerView
from docket.torrent.metainfo import build_torrent
from docket.torrent.tracker import ScrapeResult
from tests.support.fakes import FakeSeedEngine
from tests.support.procs import wait_until


def _blob(loc: Path, data: bytes, deadline_in: float = 60.0) -> SeedRequest:
    hexd = hashlib.sha256(data).hexdigest()
    blob, work = loc / "blobs" / hexd, loc / "torrents" / hexd
    blob.parent.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    build_torrent(blob, "http://127.0.0.1:1/announce", out=work / f"{hexd}.torrent")
    return SeedRequest(digest=f"sha256:{hexd}", torrent=str(work / f"{hexd}.torrent"), blob=str(blob),
                       workdir=str(work), deadline=time.time() + deadline_in, listen_ip="127.0.0.9", port=2701,
                       size=len(data), ref="docket agent")


@pytest.fixture
def keep(tmp_path: Path) -> Iterator[tuple[SeedDaemon, FakeSeedEngine, SeederFiles, threading.Thread]]:
    """A keep-mode daemon running in a thread; its tracker says nobody downloads anything (a normal seeder would
    stop every blob and end)."""
    loc = tmp_path / "loc"
    engine = FakeSeedEngine()
    daemon = SeedDaemon(SeederFiles(loc), engine=engine, tracker=TrackerView(lambda url, ih: ScrapeResult(1, 0, 0)),
                        scrape_interval=0.05, keep=True)
    assert daemon.take_lock()
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        yield daemon, engine, daemon.files, thread
    finally:
        daemon.term.set()
        thread.join(10)
    assert not thread.is_alive()


def test_keep_mode_never_ends_by_itself_and_ignores_deadlines_and_scrapes(keep, tmp_path: Path):
    daemon, engine, files, thread = keep
    time.sleep(seedd.LINGER + 0.5)  # idle longer than a pull's seeder lingers
    assert thread.is_alive()
    req = _blob(files.location, b"x" * 50_000, deadline_in=0.3)  # a deadline that passes at once
    files.post({"op": "seed", **req.__dict__})
    wait_until(lambda: engine.seeds, timeout=5, what="the seeder to start")
    time.sleep(1.0)  # past the deadline, several scrape rounds saying nobody downloads
    assert not engine.seeds[0].stopped and req.digest in daemon.seeding
    assert files.pid.read_text().split() == [str(os.getpid()), "agent"]
    wait_until(lambda: files.read_state()["blobs"], timeout=5, what="the state file")
    state = files.read_state()
    assert state["agent"] is True and state["blobs"][0]["seconds_left"] is None


def test_an_exited_ctorrent_is_started_again_after_restart_after(keep, monkeypatch):
    monkeypatch.setattr(seedd, "RESTART_AFTER", 0.5)
    daemon, engine, files, _ = keep
    req = _blob(files.location, b"y" * 50_000)
    files.post({"op": "seed", **req.__dict__})
    wait_until(lambda: engine.seeds, timeout=5, what="the seeder to start")
    engine.seeds[0].exited = True
    t0 = time.monotonic()
    wait_until(lambda: len(engine.seeds) == 2, timeout=5, what="the seeder started again")
    assert time.monotonic() - t0 >= 0.4  # not in a tight loop: after RESTART_AFTER
    again = engine.seeds[1]
    assert again.kw["port"] == 2701 and again.kw["listen_ip"] == "127.0.0.9"  # same address: peers know it
    assert again.kw["blob"] == Path(req.blob) and daemon.seeding[req.digest].transfer is again
    time.sleep(1.0)
    assert len(engine.seeds) == 2  # a live one is not started again


def test_drop_stops_a_blob_for_good(keep, monkeypatch):
    monkeypatch.setattr(seedd, "RESTART_AFTER", 0.2)
    daemon, engine, files, _ = keep
    req = _blob(files.location, b"z" * 50_000)
    files.post({"op": "seed", **req.__dict__})
    wait_until(lambda: engine.seeds, timeout=5, what="the seeder to start")
    files.post({"op": "drop", "digests": [req.digest]})
    wait_until(lambda: engine.seeds[0].stopped, timeout=5, what="the dropped seeder to stop")
    time.sleep(0.6)
    assert req.digest not in daemon.seeding and len(engine.seeds) == 1  # stopped, not restarted
    assert daemon.finished[-1]["digest"] == req.digest


def test_a_blob_whose_file_is_gone_stops(keep, monkeypatch):
    monkeypatch.setattr(seedd, "RESTART_AFTER", 0.2)
    daemon, engine, files, _ = keep
    req = _blob(files.location, b"w" * 50_000)
    files.post({"op": "seed", **req.__dict__})
    wait_until(lambda: engine.seeds, timeout=5, what="the seeder to start")
    Path(req.blob).unlink()
    engine.seeds[0].exited = True  # ctorrent dies when its file goes
    wait_until(lambda: req.digest not in daemon.seeding, timeout=5, what="the blob to stop")
    time.sleep(0.5)
    assert len(engine.seeds) == 1
    assert daemon.finished[-1] == {**daemon.finished[-1], "digest": req.digest, "why": "its file is gone"}
