"""Several registry instances on one PostgreSQL database and one location (docs/instances.md), in process: two
apps share a database made for the test on a real PostgreSQL server. One leads (GC, retention, the scrubber) and
the lead moves when its connection dies; damage one marks, the other refuses; the other seeds what one stored;
start-up beside a push in flight neither refuses nor adopts; a managed tracker or another tracker is refused.

Each test gets a database of its own (``pg_url``: tests/conftest.py), dropped afterwards.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import create_engine, text

from docket.errors import DocketError
from docket.registry.health import report
from docket.registry.instances import LEADER_KEY
from docket.registry.models import Blob, RegistryInstance, utcnow
from docket.registry.periodic import Periodic
from docket.registry.scrub import MARKS_TTL
from docket.registry.seeder import SeederSupervisor, reap_dirs
from docket.registry.seedsync import SeedPlan, SeedSync, dirs_to_keep, plan
from tests.support.apps import close_app, registry_app
from tests.support.procs import wait_until


@pytest.fixture
def pair(location: Path, pg_url: str) -> Iterator[Callable[..., Flask]]:
    """Apps on one location and one database; their instances are stopped and the apps closed at teardown."""
    made: list[Flask] = []

    def make(**overrides: Any) -> Flask:
        app = registry_app(location, db_url=pg_url, **overrides)
        made.append(app)
        return app

    yield make
    for app in made:
        sv = app.extensions["docket"]
        sv.gc.stop()
        sv.instances.stop()
        close_app(app)


def sv_of(app: Flask) -> Any:
    return app.extensions["docket"]


def upload(app: Flask, data: bytes, kind: str = "config") -> str:
    resp = app.test_client().post(f"/api/v1/blobs?kind={kind}", data=data,
                                  headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code in (200, 201), resp.get_json()
    return resp.get_json()["digest"]


def terminate_leader_connection(pg_url: str) -> int:
    """End the PostgreSQL backend holding the maintenance lock (as when its instance's host dies)."""
    key = LEADER_KEY & 0xFFFFFFFFFFFFFFFF
    engine = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            return len(conn.execute(text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND classid = :c "
                "AND objid = :o AND objsubid = 1 AND database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())"), {"c": key >> 32, "o": key & 0xFFFFFFFF}).all())
    finally:
        engine.dispose()


# -- pure parts ---------------------------------------------------------------------------------------------------
def test_seed_plan_starts_the_missing_and_stops_the_unwanted() -> None:
    wanted = {"sha256:a": "ha", "sha256:b": "hb", "sha256:c": "hc"}
    assert plan(wanted, ["sha256:b", "sha256:x", "sha256:y"]) == SeedPlan(
        start=[("sha256:a", "ha"), ("sha256:c", "hc")], stop=["sha256:x", "sha256:y"])
    assert plan(wanted, wanted) == SeedPlan()
    assert plan({}, []) == SeedPlan()


def test_seeder_dirs_kept_live_and_other_hosts_dead_ones(tmp_path: Path) -> None:
    rows = [("a" * 32, "here"), ("b" * 32, "here"), ("c" * 32, "elsewhere")]
    keep = dirs_to_keep(rows, {"a" * 32}, "here")
    assert keep == {"a" * 32, "c" * 32}  # b died on this host; c's ctorrents can only be stopped on its own host
    for name in ("a" * 32, "b" * 32, "c" * 32, "d" * 32, "e" * 64):  # d: row forgotten; e: a one-instance run's
        (tmp_path / name / ("f" * 64)).mkdir(parents=True)
    assert reap_dirs(tmp_path, keep) == ["b" * 32, "d" * 32, "e" * 64]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a" * 32, "c" * 32]


def test_periodic_runs_a_pass_only_when_its_guard_says_so() -> None:
    runs: list[float] = []
    allowed = threading.Event()
    worker = Periodic("guarded", 0.02, lambda: runs.append(time.monotonic()), when=allowed.is_set)
    worker.start()
    try:
        time.sleep(0.2)
        assert runs == []
        allowed.set()
        wait_until(lambda: len(runs) >= 2, timeout=5, what="passes once allowed")
    finally:
        worker.stop()


# -- two instances on one database ----------------------------------------------------------------------------------
def test_one_instance_leads_and_the_lead_moves_when_its_connection_dies(pair, pg_url: str) -> None:
    a, b = sv_of(pair(gc_interval=0.1)), sv_of(pair(gc_interval=0.1))
    assert a.instances.shared and b.instances.shared and a.locks.shared
    a.instances.start()
    b.instances.start()
    assert a.instances.is_leader() and not b.instances.is_leader()  # the first one takes the lock
    # a leader whose host vanishes loses the lock by the server's keepalive, in seconds (not the kernel's 2 h)
    assert a.instances.leadership._conn.execute(text("SHOW tcp_keepalives_idle")).scalar() == "5"
    a.gc.start()
    b.gc.start()
    wait_until(lambda: a.gc.stats.runs >= 2, timeout=10, what="the leader's GC passes")
    assert b.gc.stats.runs == 0  # the timer of an instance that does not lead runs no pass
    b.gc.run_once()  # a direct call (the admin trigger) still runs anywhere
    assert b.gc.stats.runs == 1

    health = report(b)[1]["instances"]
    assert health["leader"] is False and health["live"] == 2 and {i["id"] for i in health["instances"]} == {
        a.instances.id, b.instances.id}
    assert [i["leader"] for i in health["instances"] if i["id"] == a.instances.id] == [True]

    a.instances._worker.stop()  # a hangs (its process or host died): no beat takes the lock again
    assert terminate_leader_connection(pg_url) == 1
    wait_until(b.instances.is_leader, timeout=10, what="the other instance to take the lead")
    runs = b.gc.stats.runs
    wait_until(lambda: b.gc.stats.runs > runs, timeout=10, what="GC on the new leader")
    assert not a.instances.leadership.refresh()  # the old one finds out at its next beat, and follows


def test_a_killed_instance_of_this_host_is_not_running_at_once(pair) -> None:
    me = sv_of(pair()).instances
    me.start()
    gone = subprocess.Popen(["true"])
    gone.wait()
    now = utcnow()
    with me.db.session() as s:
        for name, host, pid in (("killed", socket.gethostname(), gone.pid), ("elsewhere", "other-host", gone.pid),
                                ("running", socket.gethostname(), os.getpid())):
            s.add(RegistryInstance(id=name.ljust(32, "0"), hostname=host, pid=pid, url="http://x", version="0",
                                   started_at=now, seen_at=now))
        s.commit()
    assert len(me.live_ids()) == 4  # its row looks live for 15 s more
    assert sorted(row.id[:9].rstrip("0") for row in me.others_running()) == ["elsewhere", "running"]


def test_metrics_count_the_instances_and_the_leader(pair) -> None:
    first, second = pair(), pair()
    sv_of(first).instances.start()
    sv_of(second).instances.start()
    text_ = second.test_client().get("/metrics").get_data(as_text=True)
    assert 'docket_registry_instances{state="live"} 2.0' in text_
    assert "docket_registry_leader 0.0" in text_
    assert "docket_registry_leader 1.0" in first.test_client().get("/metrics").get_data(as_text=True)
    page = first.test_client().get("/").get_data(as_text=True)
    assert sv_of(second).instances.id[:12] in page and "(this one)" in page


def test_damage_found_through_one_is_refused_by_the_other_until_repaired(pair) -> None:
    first, second = pair(), pair()
    data = b'{"a": "' + b"x" * 50_000 + b'"}'
    digest = upload(first, data)
    path = sv_of(first).store.local_path(digest)
    path.write_bytes(data.replace(b"x", b"y", 1))  # same size: only a re-hash sees it
    assert sv_of(first).scrubber.run_once()["corrupt"] == [digest]

    client = second.test_client()
    resp = client.get(f"/api/v1/blobs/{digest}")
    assert resp.status_code == 503 and resp.get_json()["error"]["code"] == "BLOB_CORRUPT"
    assert client.head(f"/api/v1/blobs/{digest}").status_code == 404  # so that a push uploads it again
    health = client.get("/healthz")
    assert health.status_code == 503 and health.get_json()["checks"]["blob_store"]["corrupt"] == [digest]
    assert sv_of(second).scrubber.status()["corrupt"][0]["digest"] == digest

    assert upload(second, data) == digest  # the right bytes through the other instance: repaired for both,
    # for the first one once its read of the marks is MARKS_TTL old (blob requests do not query them each)
    wait_until(lambda: first.test_client().get(f"/api/v1/blobs/{digest}").status_code == 200,
               timeout=MARKS_TTL + 3, what="the repair to show on the first instance")
    assert first.test_client().get(f"/api/v1/blobs/{digest}").data == data
    assert not sv_of(first).scrubber.damaged()


class _Seed:
    def __init__(self) -> None:
        self.pid, self.listen_port, self.status, self.stopped = 4242, None, None, False

    def alive(self) -> bool:
        return not self.stopped

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True


class _Engine:
    """Seeds without ctorrent, recording the work directories."""

    def __init__(self) -> None:
        self.workdirs: list[Path] = []

    def seed(self, torrent: Path, blob: Path, *, workdir: Path, **kw: Any) -> _Seed:
        assert torrent.is_file() and blob.is_file()
        self.workdirs.append(workdir)
        return _Seed()

    def forget(self, workdir: Path) -> None:
        pass


def test_the_other_instance_seeds_what_one_stored_and_stops_what_goes(pair, location: Path) -> None:
    first, second = pair(), pair()
    sv = sv_of(second)
    sv.instances.start()
    engine = _Engine()
    sv.swarm.seeders = SeederSupervisor(listen_ip="127.0.0.2", engine=engine)  # type: ignore[arg-type]
    sync = SeedSync(sv.db, sv.store, sv.locks, sv.swarm, sv.instances, root=sv.store.seeders_dir)
    assert sync.enabled and sv.swarm.seeders_dir == location / "seeders" / sv.instances.id
    try:
        layer = upload(first, os.urandom(40_000), kind="layer")
        upload(first, b'{"config": 1}')  # not a seeded kind
        assert sync.run_once() == SeedPlan(start=info_hashes(sv, layer))
        assert sv.swarm.seeders.digests() == [layer]
        assert engine.workdirs == [location / "seeders" / sv.instances.id / layer[7:]]
        assert sync.run_once() == SeedPlan()  # nothing changed
        later = upload(first, os.urandom(30_000), kind="layer")
        assert sync.expected([layer, later]) == [layer]  # /healthz: not degraded before the next sync
        assert sync.run_once().start == info_hashes(sv, later) and sync.expected([layer, later]) == [layer, later]
        with sv_of(first).locks.blob(later):
            assert sv_of(first).blobs.drop_locked(later, None, require_unreferenced_mark=False)
        assert sync.run_once() == SeedPlan(stop=[later])

        assert sv_of(first).scrubber.is_damaged(layer) is False
        with sv_of(first).db.session() as s:  # found damaged (by the leader's scrubber)
            s.execute(text("INSERT INTO blob_damage (digest, reason, detected_at) VALUES (:d, 'missing', :t)"),
                      {"d": layer, "t": utcnow().replace(tzinfo=None)})
            s.commit()
        assert sync.run_once() == SeedPlan(stop=[layer]) and sv.swarm.seeders.digests() == []
        sv_of(first).scrubber.clear(layer)
        assert sync.run_once().start and sv.swarm.seeders.digests() == [layer]

        with sv_of(first).locks.blob(layer):  # GC on the leader deletes it
            assert sv_of(first).blobs.drop_locked(layer, None, require_unreferenced_mark=False)
        assert sync.run_once() == SeedPlan(stop=[layer]) and sv.swarm.seeders.digests() == []
        assert not (sv.swarm.seeders_dir / layer[7:]).exists()
    finally:
        sv.swarm.seeders.stop()


def info_hashes(sv: Any, digest: str) -> list[tuple[str, str]]:
    with sv.db.session() as s:
        blob = s.get(Blob, digest)
        assert blob is not None and blob.info_hash
        return [(digest, blob.info_hash)]


def test_startup_beside_a_push_in_flight_neither_refuses_nor_adopts(pair) -> None:
    first, second = pair(), pair()
    a, b = sv_of(first), sv_of(second)
    data = b'{"first": "blob"}'
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    result: dict[str, Any] = {}

    def start_b() -> None:
        try:
            result["blobs"] = b.reconciler.run()
        except Exception as exc:  # noqa: BLE001 - reported below
            result["error"] = exc

    with a.locks.blob(digest):  # a push on the first instance: its file placed, its row not yet written
        path = a.store.local_path(digest)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        starter = threading.Thread(target=start_b)
        starter.start()
        time.sleep(0.5)
        assert starter.is_alive()  # the database knows no blob and a file has no row: it waits for the lock
        with a.db.session() as s:
            s.add(Blob(digest=digest, size=len(data), kind="config", unreferenced_at=None))
            s.commit()
    starter.join(timeout=30)
    assert "error" not in result, result
    with b.db.session() as s:
        row = s.get(Blob, digest)
        assert row is not None and row.kind == "config" and row.unreferenced_at is None  # as the push wrote it


def test_instances_starting_at_once_reconcile_one_after_the_other(pair) -> None:
    first, second = pair(), pair()
    done = threading.Event()
    with sv_of(first).locks.startup:
        thread = threading.Thread(target=lambda: (sv_of(second).reconciler.run(), done.set()))
        thread.start()
        assert not done.wait(0.5)
    assert done.wait(30)
    thread.join()


def test_an_instance_with_another_tracker_is_refused_while_others_run(pair) -> None:
    first = pair(tracker="127.0.0.1:7001")
    upload(first, os.urandom(20_000), kind="layer")
    sv_of(first).instances.start()
    second = pair(tracker="127.0.0.1:7002")
    with pytest.raises(DocketError) as caught:
        sv_of(second).reconciler.run()
    assert "127.0.0.1:7001" in caught.value.message and "--tracker 127.0.0.1:7001" in (caught.value.hint or "")
    assert sv_of(first).swarm.torrent_announce(
        next(iter(d for d in sv_of(first).store.digests()))) == "http://127.0.0.1:7001/announce"  # untouched


def test_a_managed_tracker_beside_other_instances_is_refused(pair) -> None:
    first = pair()
    sv_of(first).instances.start()
    second = sv_of(pair(seeding=True))  # no --tracker: it would run its own opentracker
    try:
        with pytest.raises(DocketError) as caught:
            second.start()
        assert "--tracker" in caught.value.message and "docket-tracker" in (caught.value.hint or "")
        assert second.swarm.tracker.pid is None  # refused before the tracker or any seeder started
    finally:
        second.stop()
    assert {row.id for row in sv_of(first).instances.listing()} == {sv_of(first).instances.id}  # its row is gone


def test_one_registry_alone_on_postgresql_may_manage_its_tracker(pair) -> None:
    alone = sv_of(pair(seeding=True))
    alone.instances.start()
    alone._refuse_managed_tracker_beside_others()  # nobody else: no error
