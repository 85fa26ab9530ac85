"""The blob scrubber (docket/registry/scrub.py), in process: same-size corruption is found, reported, not served,
and repaired by an upload of the right bytes or by restoring the file."""

from __future__ import annotations

import hashlib
from pathlib import Path

PUSH_TOKEN = "push-token-0123456789abcdef"


def _upload(client, data: bytes, **kw):
    return client.post("/api/v1/blobs?kind=config", data=data, headers={"Content-Type": "application/octet-stream"},
                       **kw)


def _flip(path: Path) -> bytes:
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    path.write_bytes(bytes(bad))
    return good


def test_corrupt_blob_is_reported_refused_and_repaired_by_upload(app):
    client, sv = app.test_client(), app.extensions["docket"]
    data, other = b'{"a": "' + b"x" * 100_000 + b'"}', b'{"b": 1}'
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert _upload(client, data).status_code == 201
    assert _upload(client, other).status_code == 201
    assert sv.scrubber.run_once()["corrupt"] == []
    _flip(sv.store.local_path(digest))
    assert client.get("/healthz").status_code == 200  # same size: the stat check alone cannot see it

    summary = sv.scrubber.run_once()
    assert summary["checked"] == 2 and summary["corrupt"] == [digest]
    health = client.get("/healthz")
    assert health.status_code == 503
    store = health.get_json()["checks"]["blob_store"]
    assert store["corrupt"] == [digest] and digest in store["error"] and not store["ok"]
    resp = client.get(f"/api/v1/blobs/{digest}")
    assert resp.status_code == 503
    err = resp.get_json()["error"]
    assert err["code"] == "BLOB_CORRUPT" and digest in err["message"] and err["hint"]
    assert client.head(f"/api/v1/blobs/{digest}").status_code == 404  # so a push uploads it again
    other_digest = "sha256:" + hashlib.sha256(other).hexdigest()
    assert client.get(f"/api/v1/blobs/{other_digest}").data == other

    assert _upload(client, data).status_code == 200  # the right bytes again: replaces the bad file
    assert client.get(f"/api/v1/blobs/{digest}").data == data
    assert client.get("/healthz").status_code == 200
    assert sv.scrubber.run_once()["corrupt"] == []


def test_missing_and_restored_blob(app):
    client, sv = app.test_client(), app.extensions["docket"]
    data = b'{"c": 3}'
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert _upload(client, data).status_code == 201
    path = sv.store.local_path(digest)
    good = _flip(path)
    sv.scrubber.run_once()
    assert client.get(f"/api/v1/blobs/{digest}").status_code == 503
    path.write_bytes(good)  # the operator restores the file
    assert sv.scrubber.run_once()["corrupt"] == []
    assert client.get(f"/api/v1/blobs/{digest}").data == data
    path.unlink()
    assert sv.scrubber.run_once()["corrupt"] == [digest]
    resp = client.get(f"/api/v1/blobs/{digest}")
    assert resp.status_code == 503 and "missing" in resp.get_json()["error"]["message"]


def test_admin_scrub_needs_a_push_token(tmp_path: Path, make_app):
    app = make_app(auth_tokens=(PUSH_TOKEN,))
    try:
        client = app.test_client()
        assert client.post("/api/v1/admin/scrub").status_code == 401
        resp = client.post("/api/v1/admin/scrub", headers={"Authorization": f"Bearer {PUSH_TOKEN}"})
        assert resp.status_code == 200 and resp.get_json()["corrupt"] == [] and resp.get_json()["passes"] == 1
    finally:
        app.extensions["docket"].db.dispose()


def test_interval_zero_disables_the_background_scrub(tmp_path: Path, make_app):
    app = make_app(scrub_interval=0)
    try:
        sv = app.extensions["docket"]
        sv.scrubber.start()
        assert not sv.scrubber._worker.running
    finally:
        app.extensions["docket"].db.dispose()
