"""SeederSupervisor on its own, with a stand-in process class (no ctorrent needed): restart, backoff, stop."""

from __future__ import annotations

import itertools
from pathlib import Path

from docket.registry.seeder import SeederSupervisor, SeedSpec, _backoff
from tests.support.procs import wait_until

_pids = itertools.count(1000)


class FakeProc:
    instances: list[FakeProc] = []

    def __init__(self, torrent, save_as, *, workdir, listen_ip, seed_only, **engine_kw):  # port, log_path, ...
        self.pid = next(_pids)
        self.listen_port = None
        self.status = None
        self.running = False
        self.stopped = False
        assert seed_only and listen_ip == "127.0.0.2"
        FakeProc.instances.append(self)

    def start(self):
        self.running = True
        self.listen_port = 7000

    def alive(self):
        return self.running

    def wait_listening(self, timeout):
        return 7000

    def stop(self):
        self.running = False
        self.stopped = True

    def tail(self, n=20):
        return ["bye"]


class FakeTracker:
    def __init__(self):
        self.dead = False
        self.restarts = 0

    def needs_restart(self):
        return self.dead

    def restart(self):
        self.dead = False
        self.restarts += 1


def spec(tmp_path: Path, n: int) -> SeedSpec:
    d = f"sha256:{n:064x}"
    return SeedSpec(d, tmp_path / f"{n}.torrent", tmp_path / f"{n}", tmp_path / "seeders" / str(n))


def test_restart_dead_seeder_and_tracker(tmp_path: Path) -> None:
    FakeProc.instances.clear()
    tracker = FakeTracker()
    sup = SeederSupervisor(listen_ip="127.0.0.2", tracker=tracker, interval=0.05, process_factory=FakeProc)
    a, b = spec(tmp_path, 1), spec(tmp_path, 2)
    assert sup.ensure(a) and sup.ensure(b)
    assert sup.ensure(a) and len(FakeProc.instances) == 2  # idempotent
    assert (a.workdir / "ctorrent.pid").read_text().strip() == str(FakeProc.instances[0].pid)
    sup.start()
    try:
        first = FakeProc.instances[0]
        first.running = False  # "killed"
        wait_until(lambda: sup.snapshot()[a.digest]["alive"] and sup.snapshot()[a.digest]["pid"] != first.pid, 2)
        assert sup.snapshot()[a.digest]["restarts"] == 1
        count = len(FakeProc.instances)
        tracker.dead = True  # tracker died: restart it, then every seeder
        wait_until(lambda: tracker.restarts == 1 and len(FakeProc.instances) == count + 2, 2)
        sup.remove(b.digest)
        assert b.digest not in sup.snapshot()
        assert sup.stats.restarts == 3  # /metrics: a's death, then both with the tracker; kept when b goes
    finally:
        sup.stop()
    assert all(not p.running for p in FakeProc.instances)
    assert sup.snapshot() == {}
    assert not (a.workdir / "ctorrent.pid").exists()


def test_backoff_grows_and_caps() -> None:
    assert [_backoff(n) for n in (1, 2, 3, 4, 10)] == [0.0, 1.0, 2.0, 4.0, 30.0]


def test_a_restart_under_way_starts_nothing_once_its_seeder_is_removed(tmp_path: Path) -> None:
    """A re-announce (or the watcher) restarting a seeder that ``remove`` or ``stop`` took out of the table meanwhile
    (the seed sync stops seeders of blobs gone) must not start a ctorrent nobody would ever stop."""
    FakeProc.instances.clear()
    sup = SeederSupervisor(listen_ip="127.0.0.2", process_factory=FakeProc)
    a = spec(tmp_path, 1)
    assert sup.ensure(a)
    seeder = sup._table[a.digest]
    sup.remove(a.digest)
    sup._start_one(seeder)  # the restart thread's next step
    assert len(FakeProc.instances) == 1 and not any(p.running for p in FakeProc.instances)
    sup.stop()
