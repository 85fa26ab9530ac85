"""The registry's HTTP API through Flask's test client, on a tmp location, seeding disabled (no processes).

Every rejected request must leave the registry unchanged: same listing, no blob, no torrent, nothing in uploads/.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from werkzeug.test import EnvironBuilder, run_wsgi_app

from docket.imagetar import inspect_image_tar, parse_created
from docket.registry.models import Blob, utcnow
from docket.torrent import read_torrent
from tests.support.apps import push_tarball as push
from tests.support.apps import snapshot
from tests.support.registry_images import _add, build_image_tar, config_json, layer_tar

KIB = 1024
LIMIT = 256 * KIB


pytestmark = [pytest.mark.registry_config(max_upload_size=LIMIT), pytest.mark.databases("sqlite", "postgresql")]


@pytest.fixture
def image(tmp_path: Path):
    """Factory: build an image tarball, return (bytes, info)."""
    def make(name: str = "img.tar", **kw) -> tuple[bytes, dict]:
        path = tmp_path / name
        info = build_image_tar(path, **kw)
        return path.read_bytes(), info
    return make


def assert_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.mimetype == "application/json"
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "hint"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body


# -- push, metadata, listing --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["docker", "oci"])
def test_push_stores_blob_torrent_and_record(client, location, image, layout):
    data, info = image(layout=layout)
    resp = push(client, "team/app:v1", data)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    rec = resp.get_json()
    # the whole tarball is split on the server: one layer blob (digest = diff_id) and one config blob
    layer, config = layer_tar(b"hello docket\n"), config_json(b"hello docket\n")
    digest = "sha256:" + hashlib.sha256(layer).hexdigest()
    assert rec["repository"] == "team/app" and rec["tag"] == "v1" and rec["ref"] == "team/app:v1"
    assert rec["image_id"] == info["image_id"] == "sha256:" + hashlib.sha256(config).hexdigest()
    assert rec["created"] == "2024-05-06T07:08:09Z"
    assert rec["format"] == "layers" and rec["size"] == len(layer) + len(config)
    canonical = json.dumps({"config": info["image_id"], "layers": [digest]}, separators=(",", ":"), sort_keys=True)
    v2 = client.get("/v2/team/app/manifests/v1")  # the record's digest is the V2 manifest's (docs/v2.md)
    assert v2.status_code == 200 and rec["digest"] == "sha256:" + hashlib.sha256(v2.data).hexdigest()
    assert rec["config"] == {"digest": info["image_id"], "size": len(config),
                             "blob_url": f"/api/v1/blobs/{info['image_id']}"}
    [lrec] = rec["layers"]
    assert lrec["digest"] == digest and lrec["size"] == len(layer)
    assert lrec["torrent_url"] == f"/api/v1/blobs/{digest}/torrent" and lrec["blob_url"] == f"/api/v1/blobs/{digest}"
    assert rec["pushed_at"].endswith("Z") and len(lrec["info_hash"]) == 40 and lrec["piece_length"] >= 16 * KIB
    assert resp.headers["Location"] == "/api/v1/repositories/team/app/tags/v1"
    assert (location / "blobs" / "sha256" / digest[7:]).read_bytes() == layer
    assert (location / "blobs" / "sha256" / info["image_id"][7:]).read_bytes() == config
    assert sorted(p.name for p in (location / "torrents").iterdir()) == [f"{digest[7:]}.torrent"]  # config: none
    assert list((location / "uploads").iterdir()) == []  # the temporary tarball is gone
    manifest = client.get("/api/v1/repositories/team/app/manifests/v1")
    assert manifest.status_code == 200 and manifest.data == canonical.encode()
    assert client.get("/api/v1/repositories/team/app/tags/v1").get_json() == rec
    assert client.get("/api/v1/images").get_json() == {"images": [rec]}


def test_empty_registry_lists_nothing(client):
    resp = client.get("/api/v1/images")
    assert resp.status_code == 200 and resp.get_json() == {"images": []}


def test_listing_sorted_by_ref(client, image):
    """By repository, then tag, in code-point order on both databases (an en-US collation puts "a" before "Z")."""
    data, _ = image()
    for ref in ("zeta:1", "alpha/b:2", "alpha/b:10", "alpha:x", "zeta:a", "zeta:Z", "zeta:_u"):
        assert push(client, ref, data).status_code == 201
    refs = [r["ref"] for r in client.get("/api/v1/images").get_json()["images"]]
    assert refs == ["alpha:x", "alpha/b:10", "alpha/b:2", "zeta:1", "zeta:Z", "zeta:_u", "zeta:a"]


def test_registry_host_in_repository_name(client, image):
    data, _ = image()
    resp = push(client, "localhost:5000/team/app:v1", data)
    assert resp.status_code == 201
    assert client.get("/api/v1/repositories/localhost:5000/team/app/tags/v1").get_json()["ref"] == \
        "localhost:5000/team/app:v1"


def test_unknown_tag_is_404(client):
    assert_error(client.get("/api/v1/repositories/nope/tags/v1"), 404, "NOT_FOUND")


# -- blobs and torrents -------------------------------------------------------------------------------------
def test_blob_download_range_and_etag(client, image):
    data = layer_tar(b"hello docket\n")
    rec = push(client, "app:v1", image()[0]).get_json()["layers"][0]
    url = rec["blob_url"]
    full = client.get(url)
    assert full.status_code == 200 and full.data == data
    assert full.headers["ETag"] == f'"{rec["digest"]}"'
    assert full.headers["Accept-Ranges"] == "bytes"
    part = client.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.data == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.data == data[-10:]
    bad = client.get(url, headers={"Range": f"bytes={len(data) + 10}-"})
    assert_error(bad, 416, "RANGE_NOT_SATISFIABLE")
    assert bad.headers["Content-Range"] == f"bytes */{len(data)}"
    cached = client.get(url, headers={"If-None-Match": f'"{rec["digest"]}"'})
    assert cached.status_code == 304
    head = client.head(url)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data) and head.data == b""
    for r in (full, part, tail, bad, cached, head):
        r.close()  # a WSGI server closes the response when sent; the counter follows
    assert client.application.extensions["docket"].downloads.count(rec["digest"]) == 0


def test_torrent_matches_record(client, image):
    data = layer_tar(b"hello docket\n")
    rec = push(client, "app:v1", image()[0]).get_json()["layers"][0]
    with client.get(rec["torrent_url"]) as resp:
        resp.data  # noqa: B018 - read the body, then close the file
    assert resp.status_code == 200 and resp.mimetype == "application/x-bittorrent"
    meta = read_torrent(resp.data)
    assert meta.info_hash == rec["info_hash"] and meta.length == len(data)
    assert meta.piece_length == rec["piece_length"]
    assert meta.announce == "http://127.0.0.1:6999/announce"
    assert resp.headers["Docket-Info-Hash"] == rec["info_hash"]


@pytest.mark.parametrize("digest", ["sha256:abc", "md5:" + "0" * 32, "sha256:" + "A" * 64, "sha256:" + "g" * 64])
def test_bad_digest_is_400(client, digest):
    assert_error(client.get(f"/api/v1/blobs/{digest}"), 400)
    assert_error(client.get(f"/api/v1/blobs/{digest}/torrent"), 400)


def test_unknown_blob_is_404(client):
    digest = "sha256:" + "0" * 64
    assert_error(client.get(f"/api/v1/blobs/{digest}"), 404)
    assert_error(client.get(f"/api/v1/blobs/{digest}/torrent"), 404)
    assert client.head(f"/api/v1/blobs/{digest}").status_code == 404


def test_tracker_endpoints(client, image):
    assert client.get("/api/v1/tracker/whitelist").data == b""
    rec = push(client, "app:v1", image()[0]).get_json()["layers"][0]
    wl = client.get("/api/v1/tracker/whitelist")
    assert wl.mimetype == "text/plain" and wl.data.decode() == rec["info_hash"] + "\n"
    assert client.get("/api/v1/tracker").get_json() == {"announce_url": "http://127.0.0.1:6999/announce",
                                                        "managed": True}


# -- re-push, delete, GC ------------------------------------------------------------------------------------
def test_repush_replaces_tag_and_gc_collects_old_blob(app, client, location, image):
    first, _ = image("a.tar", payload=b"one")
    second, info2 = image("b.tar", payload=b"two")
    img1 = push(client, "app:v1", first).get_json()
    img2 = push(client, "app:v1", second).get_json()
    rec1, rec2 = img1["layers"][0], img2["layers"][0]
    assert rec2["digest"] != rec1["digest"] and img2["image_id"] == info2["image_id"]
    assert [r["digest"] for r in client.get("/api/v1/images").get_json()["images"]] == [img2["digest"]]
    services = app.extensions["docket"]
    with services.db.session() as s:
        old = s.get(Blob, rec1["digest"])
        assert old.unreferenced_at is not None and s.get(Blob, img1["image_id"]).unreferenced_at is not None
        assert s.get(Blob, rec2["digest"]).unreferenced_at is None
    # within the grace period nothing goes; an in-flight download also holds it
    assert services.gc.run_once() == []
    services.downloads.acquire(rec1["digest"])
    # the old config and the old V2 manifest's bytes
    assert sorted(services.gc.run_once(now=utcnow() + timedelta(hours=1))) == sorted([img1["image_id"], img1["digest"]])
    services.downloads.release(rec1["digest"])
    assert services.gc.run_once(now=utcnow() + timedelta(hours=1)) == [rec1["digest"]]
    assert_error(client.get(rec1["blob_url"]), 404)
    assert not (location / "blobs" / "sha256" / rec1["digest"][7:]).exists()
    assert not (location / "torrents" / f"{rec1['digest'][7:]}.torrent").exists()
    assert client.get("/api/v1/tracker/whitelist").data.decode() == rec2["info_hash"] + "\n"
    with client.get(rec2["blob_url"]) as resp:
        assert resp.data == layer_tar(b"two")


def test_same_bytes_two_tags_share_one_blob(app, client, location, image):
    data, _ = image()
    r1 = push(client, "app:v1", data).get_json()
    r2 = push(client, "app:latest", data).get_json()
    assert r1["digest"] == r2["digest"] and r1["layers"] == r2["layers"]
    assert len(list((location / "blobs" / "sha256").iterdir())) == 3  # one layer, one config, one V2 manifest
    assert client.delete("/api/v1/repositories/app/tags/v1").status_code == 204
    with app.extensions["docket"].db.session() as s:
        assert s.get(Blob, r1["layers"][0]["digest"]).unreferenced_at is None  # still used by app:latest
        assert s.get(Blob, r1["image_id"]).unreferenced_at is None


def test_delete_then_repush_same_bytes_rereferences(app, client, image):
    data, _ = image()
    rec = push(client, "app:v1", data).get_json()["layers"][0]
    resp = client.delete("/api/v1/repositories/app/tags/v1")
    assert resp.status_code == 204 and resp.data == b""
    assert_error(client.get("/api/v1/repositories/app/tags/v1"), 404)
    assert client.get("/api/v1/images").get_json() == {"images": []}
    assert_error(client.delete("/api/v1/repositories/app/tags/v1"), 404)
    services = app.extensions["docket"]
    with services.db.session() as s:
        assert s.get(Blob, rec["digest"]).unreferenced_at is not None
    assert push(client, "app:v2", data).status_code == 201
    with services.db.session() as s:
        assert s.get(Blob, rec["digest"]).unreferenced_at is None
    assert services.gc.run_once(now=utcnow() + timedelta(hours=1)) == []


# -- rejected requests leave nothing behind -----------------------------------------------------------------
@pytest.mark.parametrize("path", [
    "/api/v1/repositories/UPPER/tags/v1",
    "/api/v1/repositories/a/../b/tags/v1",
    "/api/v1/repositories/a//b/tags/v1",
    "/api/v1/repositories/app/tags/-bad",
    "/api/v1/repositories/app/tags/" + "x" * 200,
    "/api/v1/repositories/app;rm -rf/tags/v1",
])
def test_bad_names_rejected(client, location, image, path):
    before = snapshot(client, location)
    resp = client.put(path, data=image()[0], headers={"Content-Type": "application/x-tar"})
    assert 400 <= resp.status_code < 500
    assert resp.get_json()["error"]["code"] in {"INVALID_REFERENCE", "NOT_FOUND"}
    assert snapshot(client, location) == before


def _member(name: str, **fields):
    def mutate(tar: tarfile.TarFile, entry: dict) -> None:
        _add(tar, name, b"x" if fields.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else b"", **fields)
    return mutate


BAD_TARS = {
    "not a tar": lambda img: b"this is not a tar archive at all " * 100,
    "gzip garbage": lambda img: b"\x1f\x8b" + b"\x00" * 2000,
    "no manifest.json": lambda img: img(skip=("manifest.json",))[0],
    "missing layer": lambda img: img(skip=("blobs/sha256/" + "0" * 64,), layout="oci",
                                     mutate=lambda t, e: e["Layers"].append("blobs/sha256/" + "0" * 64))[0],
    "missing config": lambda img: img(manifest=[{"Config": "nope.json", "RepoTags": [], "Layers": []}])[0],
    "dotdot member": lambda img: img(mutate=_member("../evil"))[0],
    "nested dotdot member": lambda img: img(mutate=_member("a/../../evil"))[0],
    "absolute member": lambda img: img(mutate=_member("/etc/evil"))[0],
    "escaping symlink": lambda img: img(mutate=_member("link", type=tarfile.SYMTYPE, linkname="../../etc/passwd"))[0],
    "absolute symlink": lambda img: img(mutate=_member("link", type=tarfile.SYMTYPE, linkname="/etc/passwd"))[0],
    "escaping hardlink": lambda img: img(mutate=_member("hl", type=tarfile.LNKTYPE, linkname="../etc/passwd"))[0],
    "device file": lambda img: img(mutate=_member("dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3))[0],
    "fifo": lambda img: img(mutate=_member("fifo", type=tarfile.FIFOTYPE))[0],
    "two images": lambda img: img(manifest=[{"Config": "a", "RepoTags": [], "Layers": []}] * 2)[0],
    "manifest not json": lambda img: img(manifest="not a list")[0],
    "manifest without Layers": lambda img: img(manifest=[{"Config": "x", "RepoTags": []}])[0],
    "config digest mismatch": lambda img: img(mutate=lambda t, e: e.update(
        Config="f" * 64 + ".json") or _add(t, "f" * 64 + ".json", b"{}"))[0],
    "truncated tar": lambda img: img()[0][:1536],
}


@pytest.mark.parametrize("case", sorted(BAD_TARS))
def test_bad_tarballs_rejected(client, location, image, case):
    data = BAD_TARS[case](image)
    before = snapshot(client, location)
    body = assert_error(push(client, "app:v1", data), 400)
    assert body["error"]["code"] in {"INVALID_IMAGE", "INVALID_REQUEST"}, body
    assert snapshot(client, location) == before


def test_bad_push_does_not_replace_existing_tag(client, location, image):
    good, _ = image()
    rec = push(client, "app:v1", good).get_json()
    before = snapshot(client, location)
    assert_error(push(client, "app:v1", BAD_TARS["escaping symlink"](image)), 400)
    assert snapshot(client, location) == before
    assert client.get("/api/v1/repositories/app/tags/v1").get_json() == rec


def test_empty_body(client, location):
    before = snapshot(client, location)
    resp = client.put("/api/v1/repositories/app/tags/v1", data=b"", headers={"Content-Type": "application/x-tar"},
                      environ_overrides={"CONTENT_LENGTH": "0"})
    assert_error(resp, 400, "INVALID_REQUEST")
    assert snapshot(client, location) == before


def test_too_large_by_content_length(client, location):
    before = snapshot(client, location)
    assert_error(push(client, "app:v1", b"\0" * (LIMIT + 1)), 413, "TOO_LARGE")
    assert snapshot(client, location) == before


def test_too_large_while_streaming_chunked(client, location):
    before = snapshot(client, location)
    resp = client.put("/api/v1/repositories/app/tags/v1", input_stream=io.BytesIO(b"\0" * (LIMIT * 3)),
                      headers={"Content-Type": "application/x-tar", "Transfer-Encoding": "chunked"},
                      environ_overrides={"CONTENT_LENGTH": "", "wsgi.input_terminated": True})
    assert_error(resp, 413, "TOO_LARGE")
    assert snapshot(client, location) == before


def test_chunked_push_accepted(client, image):
    data, info = image()
    resp = client.put("/api/v1/repositories/app/tags/v1", input_stream=io.BytesIO(data),
                      headers={"Content-Type": "application/x-tar", "Transfer-Encoding": "chunked"},
                      environ_overrides={"CONTENT_LENGTH": "", "wsgi.input_terminated": True})
    assert resp.status_code == 201 and resp.get_json()["image_id"] == info["image_id"]


def test_length_required(app, client, location, image):
    before = snapshot(client, location)
    environ = EnvironBuilder(path="/api/v1/repositories/app/tags/v1", method="PUT",
                             input_stream=io.BytesIO(image()[0]), content_type="application/x-tar").get_environ()
    del environ["CONTENT_LENGTH"]
    body, status, headers = run_wsgi_app(app, environ, buffered=True)
    assert status.startswith("411") and json.loads(b"".join(body))["error"]["code"] == "LENGTH_REQUIRED"
    assert snapshot(client, location) == before


def test_body_shorter_than_content_length(client, location, image):
    data, _ = image()
    before = snapshot(client, location)
    resp = client.put("/api/v1/repositories/app/tags/v1", input_stream=io.BytesIO(data),
                      headers={"Content-Type": "application/x-tar"},
                      environ_overrides={"CONTENT_LENGTH": str(len(data) + 5000)})
    body = assert_error(resp, 400, "INVALID_REQUEST")
    assert "ended after" in body["error"]["message"]
    assert snapshot(client, location) == before


def test_body_longer_than_content_length(client, location, image):
    data, _ = image()
    before = snapshot(client, location)
    resp = client.put("/api/v1/repositories/app/tags/v1", input_stream=io.BytesIO(data),
                      headers={"Content-Type": "application/x-tar"},
                      environ_overrides={"CONTENT_LENGTH": str(len(data) // 3)})
    assert_error(resp, 400)
    assert snapshot(client, location) == before


def test_wrong_content_type(client, location, image):
    before = snapshot(client, location)
    resp = push(client, "app:v1", image()[0], headers={"Content-Type": "application/json"})
    assert_error(resp, 415, "UNSUPPORTED_MEDIA_TYPE")
    assert snapshot(client, location) == before


def test_unknown_route_and_wrong_method(client, location):
    before = snapshot(client, location)
    assert_error(client.get("/api/v1/nothing-here"), 404, "NOT_FOUND")
    assert_error(client.get("/nothing-here"), 404, "NOT_FOUND")  # "/" is the web page (tests/registry/test_web.py)
    resp = client.post("/api/v1/repositories/app/tags/v1", data=b"x")
    assert_error(resp, 405, "METHOD_NOT_ALLOWED")
    assert "PUT" in resp.headers["Allow"]
    assert_error(client.delete("/api/v1/images"), 405)
    assert snapshot(client, location) == before


def test_stale_uploads_cleaned_at_start(app, location):
    stale = location / "uploads" / "upload-stale"
    stale.write_bytes(b"half an image")
    app.extensions["docket"].uploads.sweep(exclusive=True)  # what start-up does
    assert not stale.exists()


# -- health and OpenAPI -------------------------------------------------------------------------------------
def test_healthz_instance_scope_leaves_shared_problems_out(client, app, monkeypatch):
    """A load balancer's check (deploy/haproxy.cfg): a dead tracker or a full shared volume must not take every
    instance out of rotation; an instance that does not serve, or cannot reach the database, must go."""
    full = client.get("/healthz").get_json()
    assert full["checks"]["seeders"]["ok"] is True and "tracker" in full["checks"]
    resp = client.get("/healthz?scope=instance")
    body = resp.get_json()
    assert resp.status_code == 503 and set(body["checks"]) == {"database", "blob_store", "serving"}
    assert body["checks"]["serving"]["ok"] is False  # the serve command never started this app
    app.extensions["docket"].started = True
    assert client.get("/healthz?scope=instance").status_code == 200
    def unreachable() -> None:
        raise OSError("connection refused")  # what a lost database server looks like to this instance

    monkeypatch.setattr(app.extensions["docket"].db, "ping", unreachable)
    resp = client.get("/healthz?scope=instance")
    assert resp.status_code == 503 and resp.get_json()["checks"]["database"]["ok"] is False
    app.extensions["docket"].started = False
    resp = client.get("/healthz?scope=everything")
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == "INVALID_REQUEST"


def test_healthz_ok_without_seeding(client, image, db_url):
    push(client, "app:v1", image()[0])
    resp = client.get("/healthz")
    body = resp.get_json()
    assert resp.status_code == 200, body
    assert body["status"] == "ok"
    assert set(body["checks"]) == {"database", "blob_store", "disk_space", "tracker", "seeders", "instances"}
    assert body["checks"]["blob_store"]["blobs"] == 3  # layer + config + V2 manifest
    instances = body["checks"]["instances"]
    assert instances["ok"] and len(instances["id"]) == 32
    if db_url is None:  # one process on SQLite: it leads, and shares nothing
        assert instances["leader"] and not instances["shared"]
    else:  # PostgreSQL: shared; this app never started, so it never took the maintenance lock
        assert instances["shared"] and not instances["leader"]


def test_healthz_degraded_when_blob_damaged(client, location, image):
    rec = push(client, "app:v1", image()[0]).get_json()["layers"][0]
    (location / "blobs" / "sha256" / rec["digest"][7:]).write_bytes(b"short")
    resp = client.get("/healthz")
    assert resp.status_code == 503
    body = resp.get_json()
    assert body["status"] == "degraded" and body["checks"]["blob_store"]["wrong_size"] == [rec["digest"]]


def test_openapi_describes_every_route(app, client):
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    doc = resp.get_json()
    assert doc["openapi"].startswith("3.")
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops
                  if method in {"get", "put", "post", "delete", "head", "patch"}}
    served = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = rule.rule.replace("<path:repository>", "{repository}").replace("<tag>", "{tag}") \
            .replace("<digest>", "{digest}").replace("<path:name>", "{name}").replace("<reference>", "{reference}") \
            .replace("<uuid>", "{uuid}").replace("<host_id>", "{host_id}")
        for method in rule.methods - {"OPTIONS", "HEAD"}:
            served.add((path, method))
    assert served == {m for m in documented if m[1] != "HEAD"}
    assert ("/api/v1/blobs/{digest}", "HEAD") in documented
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method in ("parameters", "head"):  # HEAD answers carry no body
                continue
            assert op.get("responses"), (path, method)
            for status, r in op["responses"].items():
                html = r.get("content", {}).keys() == {"text/html"} and path in ("/", "/repositories/{name}")
                if status.startswith(("4", "5")) and path != "/healthz" and not html:  # the web page's are pages
                    schema = "V2Errors" if path.startswith("/v2/") else "Error"
                    assert r["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{schema}"} \
                        or "$ref" in r, (path, method, status)


# -- the tarball checker on its own -------------------------------------------------------------------------
def test_inspect_both_layouts(tmp_path):
    for layout in ("docker", "oci"):
        p = tmp_path / f"{layout}.tar"
        info = build_image_tar(p, layout=layout, repo_tag="x/y:z")
        got = inspect_image_tar(p)
        assert got.image_id == info["image_id"] and got.layout == layout and got.repo_tags == ("x/y:z",)
        assert got.created is not None and got.created.year == 2024


def test_in_archive_symlink_allowed(tmp_path):
    p = tmp_path / "sym.tar"

    def mutate(tar, entry):
        _add(tar, "other/layer.tar", b"", type=tarfile.SYMTYPE, linkname=f"../{entry['Layers'][0]}")
        entry["Layers"].append("other/layer.tar")

    build_image_tar(p, mutate=mutate)
    assert len(inspect_image_tar(p).layers) == 2


def test_parse_created():
    assert parse_created("2024-01-02T03:04:05.999999999Z").isoformat() == "2024-01-02T03:04:05.999999+00:00"
    assert parse_created("2024-01-02T03:04:05+02:00").hour == 1
    assert parse_created("nonsense") is None and parse_created(None) is None


def test_select_blob_rows_direct(app, client, image):
    """The DB row agrees with the record (sizes are recorded as uploaded)."""
    img = push(client, "app:v1", image()[0]).get_json()
    rec = img["layers"][0]
    with app.extensions["docket"].db.session() as s:
        blob = s.scalars(select(Blob).where(Blob.kind == "layer")).one()
        assert (blob.digest, blob.size, blob.info_hash) == (rec["digest"], rec["size"], rec["info_hash"])
        config = s.scalars(select(Blob).where(Blob.kind == "config")).one()
        assert (config.digest, config.size, config.info_hash) == (img["image_id"], img["config"]["size"], None)
    assert json.loads(json.dumps(rec)) == rec


def test_many_pulls_at_once_never_wait_for_a_database_connection(app, client, image):
    """More concurrent blob and record requests than the connection pool keeps: a pull's request holds its
    session's connection, and nothing on its path may take a second one (the damage marks are read at most
    every 2 s, download leases published by a timer), or the requests wait for each other until the pool times
    out (30 s) and answer 500: seen with 32 pulls at once in the swarm benchmark."""
    import threading
    import time

    rec = push(client, "app:v1", image()[0]).get_json()
    layer = rec["layers"][0]
    results: list[int] = []
    lock = threading.Lock()

    def pull() -> None:
        c = app.test_client()
        codes = [c.get("/api/v1/repositories/app/tags/v1").status_code,
                 c.get(layer["torrent_url"]).status_code,
                 c.get(layer["blob_url"], headers={"Range": "bytes=0-99"}).status_code,
                 c.get(f"/api/v1/blobs/{rec['config']['digest']}").status_code]
        with lock:
            results.extend(codes)

    started = time.monotonic()
    threads = [threading.Thread(target=pull) for _ in range(80)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(set(results)) == [200, 206] and len(results) == 320
    assert time.monotonic() - started < 20  # a pool stall is 30 s
