"""Layer-level distribution (docs/layers.md) through Flask's test client, seeding disabled (no processes):
blob uploads, manifests, the whole-tarball push split into layer blobs, sharing and GC of layers."""

from __future__ import annotations

import hashlib
import io
import json
from datetime import timedelta

import pytest
from flask import Flask
from flask.testing import FlaskClient

from docket.registry.models import Blob, utcnow
from docket.torrent import read_torrent
from tests.support.apps import push_tarball, snapshot
from tests.support.registry_images import build_layered_image_tar, layer_tar

LIMIT = 256 * 1024
PUSH_TOKEN, READ_TOKEN = "push-token-0123456789", "read-token-0123456789"


pytestmark = pytest.mark.registry_config(max_upload_size=LIMIT)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def config_for(layers: list[bytes], created: str = "2025-01-02T03:04:05Z") -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "created": created,
                       "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]}}, sort_keys=True).encode()


def upload(client: FlaskClient, data: bytes, kind: str = "layer", digest: str | None = None, **kw):
    query = f"kind={kind}" + (f"&digest={digest}" if digest else "")
    headers = {"Content-Type": "application/octet-stream", **kw.pop("headers", {})}
    return client.post(f"/api/v1/blobs?{query}", data=data, headers=headers, **kw)


def put_manifest(client: FlaskClient, ref: str, config: str, layers: list[str], **kw):
    repo, _, tag = ref.rpartition(":")
    return client.put(f"/api/v1/repositories/{repo}/manifests/{tag}", json={"config": config, "layers": layers}, **kw)


def push_layers(client: FlaskClient, ref: str, layers: list[bytes], created: str = "2025-01-02T03:04:05Z") -> dict:
    """What the client does: upload each layer and the config, then the manifest."""
    config = config_for(layers, created)
    for data in layers:
        assert upload(client, data, digest=sha(data)).status_code in (200, 201)
    assert upload(client, config, kind="config", digest=sha(config)).status_code in (200, 201)
    resp = put_manifest(client, ref, sha(config), [sha(x) for x in layers])
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


def error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body["error"]) == {"code", "message", "hint"}
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def blob_row(app: Flask, digest: str) -> Blob | None:
    with app.extensions["docket"].db.session() as s:
        return s.get(Blob, digest)


# -- POST /api/v1/blobs ---------------------------------------------------------------------------------------
def test_upload_layer_blob(app, client, location):
    data = layer_tar(b"a layer\n")
    resp = upload(client, data, digest=sha(data))
    assert resp.status_code == 201, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"digest", "size", "kind", "info_hash"}
    assert body["digest"] == sha(data) and body["size"] == len(data) and body["kind"] == "layer"
    assert len(body["info_hash"]) == 40
    assert (location / "blobs" / "sha256" / sha(data)[7:]).read_bytes() == data
    with client.get(f"/api/v1/blobs/{sha(data)}/torrent") as t:
        meta = read_torrent(t.data)
    assert meta.info_hash == body["info_hash"] and meta.length == len(data)
    assert client.get("/api/v1/tracker/whitelist").data.decode() == body["info_hash"] + "\n"
    assert list((location / "uploads").iterdir()) == []
    row = blob_row(app, sha(data))
    assert row.kind == "layer" and row.unreferenced_at is not None  # GC's grace protects it until a manifest
    head = client.head(f"/api/v1/blobs/{sha(data)}")
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data)
    # uploading it again: 200, same body, nothing new
    before = snapshot(client, location)
    again = upload(client, data)
    assert again.status_code == 200 and again.get_json() == body
    assert snapshot(client, location) == before


def test_upload_config_blob_has_no_torrent(app, client, location):
    config = config_for([layer_tar(b"x")])
    resp = upload(client, config, kind="config", digest=sha(config))
    assert resp.status_code == 201
    assert resp.get_json() == {"digest": sha(config), "size": len(config), "kind": "config", "info_hash": None}
    assert list((location / "torrents").iterdir()) == []
    assert client.get("/api/v1/tracker/whitelist").data == b""
    error(client.get(f"/api/v1/blobs/{sha(config)}/torrent"), 404, "NOT_FOUND")
    head = client.head(f"/api/v1/blobs/{sha(config)}")
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(config)
    with client.get(f"/api/v1/blobs/{sha(config)}") as resp:
        assert resp.data == config
    assert upload(client, config, kind="config").status_code == 200


def test_upload_chunked(client):
    data = layer_tar(b"chunked layer")
    resp = client.post("/api/v1/blobs?kind=layer", input_stream=io.BytesIO(data),
                       headers={"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked"},
                       environ_overrides={"CONTENT_LENGTH": "", "wsgi.input_terminated": True})
    assert resp.status_code == 201 and resp.get_json()["digest"] == sha(data)


def test_upload_digest_mismatch_stores_nothing(app, client, location):
    data = layer_tar(b"tampered")
    before = snapshot(client, location)
    err = error(upload(client, data, digest="sha256:" + "0" * 64), 400, "DIGEST_MISMATCH")
    assert sha(data) in err["message"]
    assert snapshot(client, location) == before
    assert blob_row(app, sha(data)) is None


@pytest.mark.parametrize("query,code", [
    ("", "INVALID_REQUEST"),
    ("kind=tarball", "INVALID_REQUEST"),
    ("kind=blob", "INVALID_REQUEST"),
    ("kind=layer&digest=sha256:abc", "INVALID_REQUEST"),
    ("kind=layer&digest=md5:" + "0" * 32, "INVALID_REQUEST"),
])
def test_upload_bad_query(client, location, query, code):
    before = snapshot(client, location)
    error(client.post(f"/api/v1/blobs?{query}", data=b"x", headers={"Content-Type": "application/octet-stream"}),
          400, code)
    assert snapshot(client, location) == before


def test_upload_bad_bodies(client, location):
    before = snapshot(client, location)
    error(client.post("/api/v1/blobs?kind=layer", data=b"", environ_overrides={"CONTENT_LENGTH": "0"}), 400)
    error(upload(client, b"\0" * (LIMIT + 1)), 413, "TOO_LARGE")
    error(upload(client, b"x", headers={"Content-Type": "text/html"}), 415)
    error(client.post("/api/v1/blobs?kind=layer", input_stream=io.BytesIO(b"short"),
                      environ_overrides={"CONTENT_LENGTH": "500"}), 400, "INVALID_REQUEST")
    assert snapshot(client, location) == before


def test_upload_and_manifest_need_a_push_token(tmp_path, make_app):
    app = make_app(location=tmp_path / "reg", max_upload_size=LIMIT, auth_tokens=(PUSH_TOKEN,),
                   read_tokens=(READ_TOKEN,))
    try:
        client = app.test_client()
        data = layer_tar(b"auth")
        config = config_for([data])
        for resp in (upload(client, data), put_manifest(client, "app:v1", sha(config), [sha(data)])):
            assert error(resp, 401, "UNAUTHORIZED") and resp.headers["WWW-Authenticate"].startswith("Bearer")
        read = {"Authorization": f"Bearer {READ_TOKEN}"}
        error(upload(client, data, headers=read), 403, "FORBIDDEN")
        error(put_manifest(client, "app:v1", sha(config), [sha(data)], headers=read), 403, "FORBIDDEN")
        assert list((tmp_path / "reg" / "blobs" / "sha256").iterdir()) == []
        push = {"Authorization": f"Bearer {PUSH_TOKEN}"}
        assert upload(client, data, headers=push).status_code == 201
        assert upload(client, config, kind="config", headers=push).status_code == 201
        assert put_manifest(client, "app:v1", sha(config), [sha(data)], headers=push).status_code == 201
        assert client.get("/api/v1/repositories/app/manifests/v1", headers=read).status_code == 200
        error(client.get("/api/v1/repositories/app/manifests/v1"), 401)
    finally:
        app.extensions["docket"].db.dispose()


# -- PUT/GET /api/v1/repositories/<repo>/manifests/<tag> ------------------------------------------------------
def test_manifest_push_and_record(app, client, location):
    layers = [layer_tar(b"base"), layer_tar(b"app")]
    config = config_for(layers)
    rec = push_layers(client, "team/app:v1", layers)
    digests = [sha(x) for x in layers]
    canonical = json.dumps({"config": sha(config), "layers": digests}, separators=(",", ":"), sort_keys=True)
    assert rec["format"] == "layers" and rec["ref"] == "team/app:v1"
    assert rec["image_id"] == sha(config) and rec["created"] == "2025-01-02T03:04:05Z"
    v2 = client.get("/v2/team/app/manifests/v1")  # the Docker schema 2 manifest the registry wrote (docs/v2.md)
    assert v2.status_code == 200 and rec["digest"] == rec["manifest_digest"] == sha(v2.data)
    assert rec["media_type"] == v2.mimetype == "application/vnd.docker.distribution.manifest.v2+json"
    assert rec["size"] == len(config) + sum(len(x) for x in layers)
    assert rec["config"] == {"digest": sha(config), "size": len(config), "blob_url": f"/api/v1/blobs/{sha(config)}"}
    assert [x["digest"] for x in rec["layers"]] == digests
    for entry, data in zip(rec["layers"], layers):
        assert set(entry) == {"digest", "diff_id", "media_type", "size", "info_hash", "piece_length", "torrent_url",
                              "blob_url"}
        assert entry["diff_id"] == entry["digest"] and entry["media_type"] == "application/vnd.docker.image.rootfs.diff.tar"
        assert entry["size"] == len(data) and entry["torrent_url"] == f"/api/v1/blobs/{entry['digest']}/torrent"
        with client.get(entry["torrent_url"]) as t:
            assert read_torrent(t.data).info_hash == entry["info_hash"]
    assert client.get("/api/v1/repositories/team/app/tags/v1").get_json() == rec
    assert client.get("/api/v1/images").get_json() == {"images": [rec]}
    manifest = client.get("/api/v1/repositories/team/app/manifests/v1")
    assert manifest.status_code == 200 and manifest.data == canonical.encode()
    assert manifest.headers["Docket-Content-Digest"] == sha(canonical.encode())  # the docket manifest: its own
    for d in [sha(config), *digests]:
        assert blob_row(app, d).unreferenced_at is None
    error(client.get("/api/v1/repositories/team/other/manifests/v1"), 404, "NOT_FOUND")


def test_manifest_missing_blob_is_404_naming_it(client, location):
    layers = [layer_tar(b"have"), layer_tar(b"missing")]
    config = config_for(layers)
    assert upload(client, layers[0]).status_code == 201
    assert upload(client, config, kind="config").status_code == 201
    before = snapshot(client, location)
    err = error(put_manifest(client, "app:v1", sha(config), [sha(x) for x in layers]), 404, "NOT_FOUND")
    assert sha(layers[1]) in err["message"] and "kind=layer" in err["hint"]
    err = error(put_manifest(client, "app:v1", "sha256:" + "1" * 64, [sha(layers[0])]), 404, "NOT_FOUND")
    assert "sha256:" + "1" * 64 in err["message"]
    assert snapshot(client, location) == before


def test_manifest_config_mismatch_is_400(client, location):
    a, b = layer_tar(b"a"), layer_tar(b"b")
    config = config_for([a, b])
    for blob in (a, b):
        upload(client, blob)
    upload(client, config, kind="config")
    before = snapshot(client, location)
    for layers in ([sha(b), sha(a)], [sha(a)], [sha(a), sha(b), sha(a)]):
        err = error(put_manifest(client, "app:v1", sha(config), layers), 400, "INVALID_IMAGE")
        assert "diff_ids" in err["message"]
    # a layer used as the config: not an image config
    err = error(put_manifest(client, "app:v1", sha(a), [sha(a), sha(b)]), 400, "INVALID_IMAGE")
    # a config blob listed as a layer
    other = config_for([config])
    upload(client, other, kind="config")
    error(put_manifest(client, "app:v1", sha(other), [sha(config)]), 400, "INVALID_REQUEST")
    before["blobs"].append(sha(other)[7:])
    before["blobs"].sort()
    assert snapshot(client, location) == before


@pytest.mark.parametrize("body", [
    b"not json", b"[]", b'{"config": 1, "layers": []}', b'{"config": "sha256:abc", "layers": []}',
    b'{"layers": []}', b'{"config": "sha256:' + b"a" * 64 + b'", "layers": "x"}',
    b'{"config": "sha256:' + b"a" * 64 + b'", "layers": ["nope"]}', b'{"config": "sha256:' + b"a" * 64 + b'"}',
])
def test_manifest_bad_body_is_400(client, location, body):
    before = snapshot(client, location)
    error(client.put("/api/v1/repositories/app/manifests/v1", data=body,
                     headers={"Content-Type": "application/json"}), 400)
    assert snapshot(client, location) == before


def test_manifest_bad_name_and_type(client, location):
    error(put_manifest(client, "UPPER:v1", "sha256:" + "a" * 64, []), 400, "INVALID_REFERENCE")
    error(client.put("/api/v1/repositories/app/manifests/v1", data=b"{}", headers={"Content-Type": "text/plain"}),
          415)


def test_repush_replaces_and_gc_keeps_shared_layers(app, client, location):
    base, v1, v2 = layer_tar(b"base os"), layer_tar(b"app v1"), layer_tar(b"app v2")
    rec1 = push_layers(client, "app:latest", [base, v1])
    rec2 = push_layers(client, "app:latest", [base, v2], created="2025-02-02T00:00:00Z")
    assert rec2["digest"] != rec1["digest"]
    assert [r["digest"] for r in client.get("/api/v1/images").get_json()["images"]] == [rec2["digest"]]
    assert client.get("/api/v1/repositories/app/tags/latest").get_json() == rec2
    assert blob_row(app, sha(base)).unreferenced_at is None  # shared: still used by the new version
    assert blob_row(app, sha(v2)).unreferenced_at is None
    assert blob_row(app, sha(v1)).unreferenced_at is not None
    assert blob_row(app, rec1["image_id"]).unreferenced_at is not None
    services = app.extensions["docket"]
    assert services.gc.run_once() == []  # grace period
    deleted = services.gc.run_once(now=utcnow() + timedelta(hours=1))
    assert sorted(deleted) == sorted([sha(v1), rec1["image_id"], rec1["digest"]])  # + the old V2 manifest's bytes
    assert sorted(p.name for p in (location / "blobs" / "sha256").iterdir()) == \
        sorted(d[7:] for d in (sha(base), sha(v2), rec2["image_id"], rec2["digest"]))
    assert sorted(p.name for p in (location / "torrents").iterdir()) == sorted(
        f"{d[7:]}.torrent" for d in (sha(base), sha(v2)))
    assert sorted(client.get("/api/v1/tracker/whitelist").data.decode().split()) == \
        sorted(x["info_hash"] for x in rec2["layers"])


def test_delete_marks_layers_unreferenced_unless_shared(app, client):
    base, a, b = layer_tar(b"base"), layer_tar(b"a"), layer_tar(b"b")
    ra = push_layers(client, "a:v1", [base, a])
    push_layers(client, "b:v1", [base, b])
    assert client.delete("/api/v1/repositories/a/tags/v1").status_code == 204
    assert blob_row(app, sha(a)).unreferenced_at is not None
    assert blob_row(app, ra["image_id"]).unreferenced_at is not None
    assert blob_row(app, sha(base)).unreferenced_at is None
    # a blob uploaded long ago and unreferenced: a fresh upload restarts its grace period, a manifest keeps it
    services = app.extensions["docket"]
    assert upload(client, a).status_code == 200
    assert sha(a) not in services.gc.run_once(now=utcnow() + timedelta(seconds=300))
    assert put_manifest(client, "a:v2", ra["image_id"], [sha(base), sha(a)]).status_code == 201
    assert services.gc.run_once(now=utcnow() + timedelta(hours=1)) == []


def test_shared_layer_stored_once(app, client, location, tmp_path):
    """Two images (and two tags) sharing a base layer: one blob file, one torrent, one whitelist entry for it."""
    base = b"shared base layer " * 1000
    build_layered_image_tar(tmp_path / "one.tar", [base, b"one"], repo_tag="one:v1")
    build_layered_image_tar(tmp_path / "two.tar", [base, b"two"], layout="oci", repo_tag="two:v1")
    r1 = push_tarball(client, "one:v1", (tmp_path / "one.tar").read_bytes()).get_json()
    r2 = push_tarball(client, "two:v1", (tmp_path / "two.tar").read_bytes()).get_json()
    r3 = push_layers(client, "two:latest", [layer_tar(base), layer_tar(b"two")])
    assert r1["layers"][0] == r2["layers"][0] == r3["layers"][0]
    assert r2["layers"] == r3["layers"]
    files = sorted(p.name for p in (location / "blobs" / "sha256").iterdir())
    # base, one, two + 3 configs + 3 V2 manifests (one per config)
    assert files.count(r1["layers"][0]["digest"][7:]) == 1 and len(files) == 3 + 3 + 3
    assert len(list((location / "torrents").iterdir())) == 3
    assert len(client.get("/api/v1/tracker/whitelist").data.decode().split()) == 3


# -- PUT .../tags/<tag>: the whole tarball split into layers ---------------------------------------------------
@pytest.mark.parametrize("layout", ["docker", "oci"])
def test_tarball_push_split_into_layers(app, client, location, tmp_path, layout):
    """Three layers, the third a repeat of the first (a symlink in the legacy layout, the same blob in OCI)."""
    info = build_layered_image_tar(tmp_path / "img.tar", [b"base", b"middle", b"base"], layout=layout)
    data = (tmp_path / "img.tar").read_bytes()
    resp = push_tarball(client, "team/app:v1", data)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    rec = resp.get_json()
    assert rec["format"] == "layers" and rec["image_id"] == info["image_id"]
    assert [x["digest"] for x in rec["layers"]] == info["diff_ids"]
    assert rec["config"]["digest"] == info["config_digest"] and rec["config"]["size"] == len(info["config"])
    assert rec["size"] == len(info["config"]) + sum(len(x) for x in info["layers"])
    blobs = location / "blobs" / "sha256"
    assert sorted(p.name for p in blobs.iterdir()) == sorted({d[7:] for d in info["diff_ids"]} |
                                                             {info["config_digest"][7:], rec["digest"][7:]})
    for digest, layer in zip(info["diff_ids"], info["layers"]):
        assert (blobs / digest[7:]).read_bytes() == layer
        assert blob_row(app, digest).kind == "layer"
    assert (blobs / info["config_digest"][7:]).read_bytes() == info["config"]
    assert blob_row(app, info["config_digest"]).kind == "config"
    assert list((location / "uploads").iterdir()) == []  # temporary tarball and copies gone
    assert json.loads(client.get("/api/v1/repositories/team/app/manifests/v1").data) == \
        {"config": info["config_digest"], "layers": info["diff_ids"]}


@pytest.mark.parametrize("layout", ["docker", "oci"])
def test_tarball_with_wrong_diff_id_stores_nothing(client, location, tmp_path, layout):
    build_layered_image_tar(tmp_path / "bad.tar", [b"one", b"two"], layout=layout, wrong_diff_id_at=1)
    before = snapshot(client, location)
    err = error(push_tarball(client, "app:v1", (tmp_path / "bad.tar").read_bytes()), 400, "INVALID_IMAGE")
    assert "layer 2" in err["message"]
    assert snapshot(client, location) == before


def test_tarball_with_more_layers_than_diff_ids(client, location, tmp_path):
    from tests.support.registry_images import _add, build_image_tar

    def mutate(tar, entry):
        _add(tar, "extra/layer.tar", layer_tar(b"extra"))
        entry["Layers"].append("extra/layer.tar")

    build_image_tar(tmp_path / "x.tar", mutate=mutate)
    before = snapshot(client, location)
    error(push_tarball(client, "app:v1", (tmp_path / "x.tar").read_bytes()), 400, "INVALID_IMAGE")
    assert snapshot(client, location) == before


def test_tarball_push_over_uploaded_layers(app, client, location, tmp_path):
    """Layers uploaded by a client and the same layers in a tarball are the same blobs."""
    rec1 = push_layers(client, "app:v1", [layer_tar(b"base"), layer_tar(b"top")])
    build_layered_image_tar(tmp_path / "t.tar", [b"base", b"top"], created="2025-01-02T03:04:05Z")
    rec2 = push_tarball(client, "app:v2", (tmp_path / "t.tar").read_bytes()).get_json()
    assert rec1["layers"] == rec2["layers"]
    assert len(list((location / "torrents").iterdir())) == 2


@pytest.mark.e2e
def test_real_docker_save_split(docker_client, tmp_path, make_app):
    """A real `docker save` (this host's Engine): layers, including a repeated one, match RootFS.Layers."""
    import shutil
    import uuid

    from tests.support.tools import need

    ctx = tmp_path / "ctx"
    ctx.mkdir()
    shutil.copy(need("busybox"), ctx / "busybox")
    (ctx / "a.txt").write_text("same bytes\n")
    # the same COPY twice: two layers with one diff_id (Engine 20.10 saves the second as a symlink)
    (ctx / "Dockerfile").write_text("FROM scratch\nCOPY busybox /bin/busybox\nCOPY a.txt /a.txt\nCOPY a.txt /a.txt\n")
    ref = f"docket-test/split-{uuid.uuid4().hex[:8]}:v1"
    image, _ = docker_client.images.build(path=str(ctx), tag=ref, rm=True, forcerm=True)
    try:
        tar = tmp_path / "img.tar"
        with open(tar, "wb") as f:
            for chunk in docker_client.images.get(ref).save(named=True):
                f.write(chunk)
        location = tmp_path / "registry"
        app = make_app(location=location, max_upload_size=1 << 30)
        try:
            resp = push_tarball(app.test_client(), "real/app:v1", tar.read_bytes())
        finally:
            app.extensions["docket"].db.dispose()
        assert resp.status_code == 201, resp.get_data(as_text=True)
        rec = resp.get_json()
        diff_ids = image.attrs["RootFS"]["Layers"]
        assert len(diff_ids) == 3 and diff_ids[1] == diff_ids[2]
        assert rec["format"] == "layers" and rec["image_id"] == image.id
        assert [x["digest"] for x in rec["layers"]] == diff_ids
        blobs = location / "blobs" / "sha256"
        for digest in diff_ids:
            assert sha((blobs / digest[7:]).read_bytes()) == digest
        assert len(list(blobs.iterdir())) == 4  # two distinct layers + config + the V2 manifest
        assert list((location / "uploads").iterdir()) == []
    finally:
        docker_client.images.remove(ref, force=True)
