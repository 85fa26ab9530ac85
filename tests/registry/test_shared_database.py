"""Two registry instances on one PostgreSQL database and one location (docs/instances.md), in process: what
the database decides between them. Upload sessions continue on the other instance (the hash restored from the
part file), locks hold across instances, and GC on one instance counts the other's downloads and pushes.
The HAProxy end-to-end tests (tests/e2e/test_ha.py) run the same through real processes."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import select, update

from docket.registry.locks import Locks
from docket.registry.models import Blob, BlobLease, RegistryInstance, utcnow
from docket.registry.models import UploadSession as SessionRow


def sv(app: Flask):
    return app.extensions["docket"]


@pytest.fixture
def pair(make_app: Callable[..., Flask], pg_url: str, location: Path) -> tuple[Flask, Flask]:
    """Instances A and B: one database, one location."""
    return make_app(db_url=pg_url), make_app(db_url=pg_url)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_upload_session_continues_on_the_other_instance(pair, location):
    a, b = (app.test_client() for app in pair)
    first, second, third = b"A" * 300_000, b"B" * 200_000, b"C" * 1000
    resp = a.post("/v2/app/blobs/uploads/")
    assert resp.status_code == 202
    url = resp.headers["Location"]
    assert a.patch(url, data=first, headers={"Content-Range": f"0-{len(first) - 1}"}).status_code == 202
    # B has no running hash for it: it restores it from the part file
    resp = b.patch(url, data=second, headers={"Content-Range": f"{len(first)}-{len(first) + len(second) - 1}"})
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.headers["Range"] == f"0-{len(first) + len(second) - 1}"
    assert a.get(url).headers["Range"] == f"0-{len(first) + len(second) - 1}"  # the row, not A's memory
    # an out-of-order chunk on A (whose hash is stale) is refused with the size B committed
    resp = a.patch(url, data=third, headers={"Content-Range": f"0-{len(third) - 1}"})
    assert resp.status_code == 416 and resp.headers["Range"] == f"0-{len(first) + len(second) - 1}"
    body = first + second + third
    resp = a.put(f"{url}?digest={sha(body)}", data=third)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert b.get(f"/v2/app/blobs/{sha(body)}").data == body
    with sv(pair[0]).db.session() as s:
        assert s.scalars(select(SessionRow)).all() == []
    assert [p.name for p in (location / "uploads").iterdir()] == []


def test_a_session_whose_part_file_was_lost_is_unknown(pair, location):
    a, b = (app.test_client() for app in pair)
    url = a.post("/v2/app/blobs/uploads/").headers["Location"]
    assert a.patch(url, data=b"x" * 1000, headers={"Content-Range": "0-999"}).status_code == 202
    part = next((location / "uploads").iterdir())
    part.write_bytes(b"x" * 10)  # truncated behind the registry's back (a lost file, a bad copy)
    resp = b.patch(url, data=b"y", headers={"Content-Range": "1000-1000"})
    assert resp.status_code == 404 and resp.get_json()["errors"][0]["code"] == "BLOB_UPLOAD_UNKNOWN"
    assert "lost its data" in resp.get_json()["errors"][0]["message"]
    assert a.get(url).status_code == 404  # gone for every instance
    assert list((location / "uploads").iterdir()) == []


def test_a_session_is_one_request_at_a_time_across_instances(pair):
    a_app, b_app = pair
    url = a_app.test_client().post("/v2/app/blobs/uploads/").headers["Location"]
    session_id = url.rstrip("/").rsplit("/", 1)[-1]
    with sv(a_app).locks.upload(session_id) as held:  # A is busy with a request on it
        assert held
        with sv(b_app).locks.upload(session_id, blocking=False) as got:
            assert got is False  # so B's expiry passes over it, and B's requests wait
        assert sv(b_app).uploads.expire(now=utcnow() + timedelta(hours=2)) == []
    assert sv(b_app).uploads.expire(now=utcnow() + timedelta(hours=2)) == [session_id]


def test_blob_locks_hold_across_instances(pair):
    a_locks, b_locks = sv(pair[0]).locks, sv(pair[1]).locks
    assert a_locks.shared and b_locks.shared
    digest = sha(b"locked")
    events: list[str] = []

    def other() -> None:
        with b_locks.all_blobs([sha(b"another"), digest]):
            events.append("B got it")

    with a_locks.blob(digest):
        thread = threading.Thread(target=other)
        thread.start()
        time.sleep(0.5)
        events.append("A lets go")
    thread.join(10)
    assert events == ["A lets go", "B got it"]
    events.clear()

    def tags() -> None:
        with b_locks.tags:
            events.append("B tags")

    with a_locks.tags:  # the tag lock too; other names stay free
        with b_locks.upload("x", blocking=False) as got:
            assert got
        thread = threading.Thread(target=tags)
        thread.start()
        time.sleep(0.5)
        events.append("A tags done")
    thread.join(10)
    assert events == ["A tags done", "B tags"]


def test_gc_on_one_instance_waits_for_the_others_downloads_and_pushes(pair):
    a_app, b_app = pair
    a, b = a_app.test_client(), b_app.test_client()
    data = b"layer bytes" * 100
    assert a.post(f"/v2/app/blobs/uploads/?digest={sha(data)}", data=data).status_code == 201
    with sv(a_app).db.session() as s:  # unreferenced for an hour: past the grace
        s.execute(update(Blob).values(unreferenced_at=utcnow() - timedelta(hours=1)))
        s.commit()
    gc = sv(a_app).gc
    # B is downloading it (a lease row) and B is alive (its heartbeat)
    sv(b_app).instances.beat()
    sv(b_app).downloads.acquire(sha(data))
    sv(b_app).downloads.publish()  # its timer's job, every 2 s
    with sv(a_app).db.session() as s:
        assert s.scalars(select(BlobLease.instance)).all() == [sv(b_app).instances.id]
    assert gc.run_once() == []
    sv(b_app).downloads.release(sha(data))
    sv(b_app).downloads.publish()
    with sv(a_app).db.session() as s:
        assert s.scalars(select(BlobLease.instance)).all() == []
    # B receives a push's body (its heartbeat publishes the push's start): the blob uploaded an hour ago waits
    # only if it became unreferenced after that push began, so begin the push before it, as a long push would
    with sv(b_app).db.session() as s:
        s.execute(update(Blob).values(unreferenced_at=utcnow() - timedelta(minutes=30)))
        s.commit()
    activity = sv(b_app).uploads.activity
    activity._since = utcnow() - timedelta(minutes=40)  # a push running for 40 minutes, still receiving
    activity.begin()
    activity._since = utcnow() - timedelta(minutes=40)
    sv(b_app).instances.beat()
    assert gc.run_once() == []
    activity.end()
    activity._last = utcnow() - timedelta(minutes=10)  # and then it stopped, ten minutes ago
    sv(b_app).instances.beat()
    assert gc.run_once() == [sha(data)]


def test_leases_of_a_dead_instance_do_not_count(pair):
    a_app, b_app = pair
    data = b"held by the dead" * 10
    assert a_app.test_client().post(f"/v2/app/blobs/uploads/?digest={sha(data)}", data=data).status_code == 201
    sv(b_app).instances.beat()
    sv(b_app).downloads.acquire(sha(data))  # and then B is killed: its row stops being refreshed
    sv(b_app).downloads.publish()
    assert sv(a_app).downloads.count(sha(data)) == 1
    with sv(a_app).db.session() as s:
        s.execute(update(RegistryInstance).where(RegistryInstance.id == sv(b_app).instances.id).values(
            seen_at=utcnow() - timedelta(minutes=1)))
        s.commit()
    assert sv(a_app).downloads.count(sha(data)) == 0
    assert sv(a_app).downloads.forget_dead() == 1


def test_sqlite_locks_stay_in_the_process(tmp_path):
    from docket.registry.db import Database

    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    assert not Locks(db).shared
    with Locks(db).upload("s", blocking=False) as got:
        assert got


def test_running_hashes_of_sessions_ended_elsewhere_are_forgotten(pair):
    a_app, b_app = pair
    a, b = a_app.test_client(), b_app.test_client()
    url = a.post("/v2/app/blobs/uploads/").headers["Location"]
    assert a.patch(url, data=b"z" * 100, headers={"Content-Range": "0-99"}).status_code == 202
    assert len(sv(a_app).uploads._hashers) == 1
    assert b.put(f"{url}?digest={sha(b'z' * 100)}").status_code == 201  # finished on B
    sv(a_app).uploads.expire()  # A's next session open or GC pass
    assert sv(a_app).uploads._hashers == {}
