"""Conformance attacks (issue 11, "Input that must be refused": Range and GC; "Conformance with the OCI distribution
spec"): Range headers a download must ignore or refuse per RFC 9110, If-None-Match on manifests, ``?tag=`` with
``OCI-Tag`` headers, ``?digest=`` keeping sha512 for a push by tag, non-distributable (foreign) layers, the DELETE
codes the spec allows (202/404/400/405, never 409), GC during a push in progress and GC waits that anyone could
stretch forever.

Flask's test client (seeding disabled) for the many small cases; real docket-registry processes for Range, for
GC timing (a push that outlasts ``--gc-grace``) and for ``docket pull`` of an image with foreign layers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import sqlite3
import subprocess
import time
from datetime import timedelta
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient

from docket.registry.models import Blob, Image, Manifest, utcnow
from tests.support.procs import free_port, wait_until
from tests.support.registry_images import layer_tar
from tests.support.registry_server import RegistryServer
from tests.support.robustness_rows import record

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_GZIP_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
OCI_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
UPLOAD_CODES = {"BLOB_UPLOAD_INVALID", "BLOB_UPLOAD_UNKNOWN", "RANGE_INVALID"}


# -- helpers ------------------------------------------------------------------------------------------------------
pytestmark = pytest.mark.registry_config(max_upload_size=1 << 20)


def sha(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def desc(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha(data), "size": len(data), **extra}


def upload(client: FlaskClient, data: bytes, name: str = "app") -> str:
    resp = client.post(f"/v2/{name}/blobs/uploads/?digest={sha(data)}", data=data,
                       headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return sha(data)


def image(client: FlaskClient, payloads: list[bytes], name: str = "app") -> tuple[dict, list[dict], bytes]:
    """gzip layers and an image config listing their diff_ids, uploaded through /v2."""
    tars = [layer_tar(p) for p in payloads]
    blobs = [gzip.compress(t, mtime=0) for t in tars]
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2025-03-04T05:06:07Z",
                         "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]}}).encode()
    for b in (*blobs, config):
        upload(client, b, name)
    return desc(DOCKER_CONFIG, config), [desc(GZIP_LAYER, b) for b in blobs], config


def manifest_bytes(config: dict, layers: list[dict], media_type: str = DOCKER_MANIFEST) -> bytes:
    return json.dumps({"schemaVersion": 2, "mediaType": media_type, "config": config, "layers": layers},
                      indent=2).encode()


def v2_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert [e["code"] for e in body["errors"]] == [code], body
    return body["errors"][0]


def rows(app: Flask) -> tuple[list[str], list[str], list[str]]:
    """(blob digests, manifest digests, repository:tag) in the database."""
    sv = app.extensions["docket"]
    with sv.db.session() as s:
        return (sorted(b.digest for b in s.query(Blob)), sorted(m.digest for m in s.query(Manifest)),
                sorted(f"{i.repository}:{i.tag}" for i in s.query(Image)))


# -- Range (RFC 9110 section 14) ----------------------------------------------------------------------------------
RANGE_CASES = [  # header, expected status, what it is
    ("items=0-5", 200, "an unknown unit: MUST be ignored"),
    ("bytes=5-2", 200, "last before first: an invalid range-spec, ignored"),
    ("bytes=abc", 200, "not a range-spec: ignored"),
    ("bytes=0-5,10-15", 200, "two satisfiable ranges: the whole blob (the RFC allows 200)"),
    ("bytes=0-5, 990-2000", 200, "one of two ranges overlaps: the whole blob"),
    ("bytes=10-19", 206, "one satisfiable range: 206"),
    ("bytes=5000-", 416, "one range past the end: 416"),
    ("bytes=2000-2100,3000-", 416, "several ranges, none overlapping: 416"),
]


@pytest.mark.parametrize("prefix", ["/v2/app/blobs", "/api/v1/blobs"])
def test_range_headers_follow_rfc_9110(client, app, prefix):
    data = bytes(range(256)) * 4  # 1,024 bytes
    digest = upload(client, data)
    for header, status, _ in RANGE_CASES:
        resp = client.get(f"{prefix}/{digest}", headers={"Range": header})
        assert resp.status_code == status, (header, resp.status_code, resp.get_data()[:200])
        if status == 200:
            assert resp.data == data and "Content-Range" not in resp.headers, header
        elif status == 206:
            assert resp.data == data[10:20] and resp.headers["Content-Range"] == "bytes 10-19/1024"
        else:
            assert resp.headers["Content-Range"] == "bytes */1024", header
            body = resp.get_json()
            code = body["errors"][0]["code"] if prefix.startswith("/v2") else body["error"]["code"]
            assert code == "RANGE_NOT_SATISFIABLE" and code not in UPLOAD_CODES, body
        resp.close()
    assert app.extensions["docket"].downloads.count(digest) == 0  # every download released, 416s included
    record("conformance", f"Range on a blob download ({prefix}): unknown unit, invalid, multi-range, past the end",
           "unknown unit, invalid specs and multi-ranges that overlap: 200 whole blob; one range: 206; nothing "
           "overlapping: 416 RANGE_NOT_SATISFIABLE (no upload code), Content-Range bytes */LEN")


def test_range_on_a_torrent_download(client):
    """The sibling download route: /api/v1/blobs/<digest>/torrent follows the same Range rules."""
    data = bytes(range(256)) * 400
    resp = client.post(f"/api/v1/blobs?kind=layer&digest={sha(data)}", data=data,
                       headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    whole = client.get(f"/api/v1/blobs/{sha(data)}/torrent").data
    for header in ("items=0-5", "bytes=9-3", "bytes=0-5,10-15"):
        resp = client.get(f"/api/v1/blobs/{sha(data)}/torrent", headers={"Range": header})
        assert (resp.status_code, resp.data) == (200, whole), header
    resp = client.get(f"/api/v1/blobs/{sha(data)}/torrent", headers={"Range": "bytes=0-9"})
    assert (resp.status_code, resp.data) == (206, whole[:10])
    resp = client.get(f"/api/v1/blobs/{sha(data)}/torrent", headers={"Range": f"bytes={len(whole)}-"})
    assert resp.status_code == 416 and resp.get_json()["error"]["code"] == "RANGE_NOT_SATISFIABLE"
    assert resp.headers["Content-Range"] == f"bytes */{len(whole)}"
    record("conformance", "Range on a .torrent download (/api/v1/blobs/<digest>/torrent)",
           "same rules as blobs: unknown unit, invalid and multi-range: 200 whole file; one range 206; past the end "
           "416 RANGE_NOT_SATISFIABLE")


def test_range_on_a_real_registry(tmp_path):
    """The same over cheroot (a real docket-registry process): what a client on the wire sees."""
    server = RegistryServer(location=tmp_path / "registry", port=free_port(), tracker_port=free_port(),
                            log=tmp_path / "registry.log", extra_args=["--no-seeding", "--gc-interval", "0"])
    server.start()
    try:
        data = bytes(range(256)) * 4  # 1,024 bytes, as RANGE_CASES assume
        digest = sha(data)
        r = requests.post(f"{server.url}/v2/app/blobs/uploads/", params={"digest": digest}, data=data, timeout=30)
        assert r.status_code == 201, r.text
        got = {}
        for header, status, _ in RANGE_CASES:
            r = requests.get(f"{server.url}/v2/app/blobs/{digest}", headers={"Range": header}, timeout=30)
            got[header] = r.status_code
            if status == 200:
                assert r.content == data, header
            if status == 416:
                assert r.headers["Content-Range"] == f"bytes */{len(data)}"
                assert r.json()["errors"][0]["code"] == "RANGE_NOT_SATISFIABLE"
        assert got == {h: s for h, s, _ in RANGE_CASES}
        r = requests.get(f"{server.url}/v2/app/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'}, timeout=30)
        assert (r.status_code, r.content) == (304, b"")
    finally:
        server.stop()
    record("conformance", "Range over a real registry: items=0-5, bytes=5-2, bytes=0-5,10-15, bytes=5000-",
           "200, 200, 200 (whole blob), 416 RANGE_NOT_SATISFIABLE with Content-Range bytes */LEN; If-None-Match: 304")


# -- If-None-Match ------------------------------------------------------------------------------------------------
def test_manifests_honour_if_none_match(client):
    config, layers, _ = image(client, [b"etag"])
    raw = manifest_bytes(config, layers)
    assert client.put("/v2/app/manifests/v1", data=raw, headers={"Content-Type": DOCKER_MANIFEST}).status_code == 201
    etag = f'"{sha(raw)}"'
    for ref in ("v1", sha(raw)):
        for method in (client.get, client.head):
            resp = method(f"/v2/app/manifests/{ref}", headers={"If-None-Match": etag})
            assert (resp.status_code, resp.data) == (304, b""), (ref, resp.status_code)
            assert resp.headers["ETag"] == etag and resp.headers["Docker-Content-Digest"] == sha(raw)
        resp = client.get(f"/v2/app/manifests/{ref}", headers={"If-None-Match": '"sha256:' + "0" * 64 + '"'})
        assert (resp.status_code, resp.data) == (200, raw)
        resp = client.get(f"/v2/app/manifests/{ref}", headers={"If-None-Match": "*"})
        assert resp.status_code == 304
    # the /api/v1 face: docket's canonical manifest JSON of a docket push
    data = layer_tar(b"v1")
    config1 = json.dumps({"architecture": "amd64", "os": "linux",
                          "rootfs": {"type": "layers", "diff_ids": [sha(data)]}}).encode()
    for blob, kind in ((data, "layer"), (config1, "config")):
        assert client.post(f"/api/v1/blobs?kind={kind}&digest={sha(blob)}", data=blob,
                           headers={"Content-Type": "application/octet-stream"}).status_code == 201
    assert client.put("/api/v1/repositories/app/manifests/v2",
                      json={"config": sha(config1), "layers": [sha(data)]}).status_code == 201
    resp = client.get("/api/v1/repositories/app/manifests/v2")
    v1_digest = resp.headers["Docket-Content-Digest"]
    assert resp.headers["ETag"] == f'"{v1_digest}"'
    resp = client.get("/api/v1/repositories/app/manifests/v2", headers={"If-None-Match": f'"{v1_digest}"'})
    assert (resp.status_code, resp.data) == (304, b"")
    for prefix in ("/v2/app/blobs", "/api/v1/blobs"):  # blobs already did, under both APIs
        resp = client.get(f"{prefix}/{layers[0]['digest']}", headers={"If-None-Match": f'"{layers[0]["digest"]}"'})
        assert resp.status_code == 304
    record("conformance", "If-None-Match with the manifest's digest (GET and HEAD, by tag and by digest)",
           "304 without a body, ETag and Docker-Content-Digest kept (/api/v1's manifest too); another ETag: 200")


# -- ?tag= and OCI-Tag --------------------------------------------------------------------------------------------
def test_put_by_digest_with_tag_parameters(client, app):
    config, layers, _ = image(client, [b"tags"])
    raw = manifest_bytes(config, layers)
    resp = client.put(f"/v2/app/manifests/{sha(raw)}?tag=a&tag=b&tag=a", data=raw,
                      headers={"Content-Type": DOCKER_MANIFEST})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers.getlist("OCI-Tag") == ["a", "b"]
    assert resp.headers["Docker-Content-Digest"] == sha(raw)
    assert client.get("/v2/app/tags/list").get_json()["tags"] == ["a", "b"]
    for tag in ("a", "b"):
        assert client.get(f"/v2/app/manifests/{tag}").data == raw
    assert client.get("/api/v1/repositories/app/tags/b").get_json()["format"] == "layers"  # docket can pull it

    before = rows(app)
    resp = client.put(f"/v2/app/manifests/{sha(raw)}?tag=c&tag=bad%0A", data=raw,
                      headers={"Content-Type": DOCKER_MANIFEST})
    v2_error(resp, 400, "MANIFEST_INVALID")
    resp = client.put(f"/v2/app/manifests/{sha(raw)}?" + "&".join(f"tag=t{i}" for i in range(101)), data=raw,
                      headers={"Content-Type": DOCKER_MANIFEST})
    v2_error(resp, 414, "TAG_INVALID")
    assert rows(app) == before  # neither tagged anything, not even the valid "c"
    record("conformance", "PUT /v2/<name>/manifests/<digest>?tag=a&tag=b&tag=a (draft end-7b)",
           "201, one OCI-Tag header per tag (a, b), both tags point at it; a bad tag value: 400, 101 tags: 414, "
           "nothing tagged")


# -- sha512 --------------------------------------------------------------------------------------------------------
def test_push_by_tag_keeps_a_requested_sha512_digest(client, app):
    config, layers, _ = image(client, [b"sha512"])
    raw = manifest_bytes(config, layers)
    resp = client.put(f"/v2/app/manifests/v1?digest={sha(raw, 'sha512')}", data=raw,
                      headers={"Content-Type": DOCKER_MANIFEST})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["Docker-Content-Digest"] == sha(raw, "sha512")
    assert resp.headers["Location"] == f"/v2/app/manifests/{sha(raw, 'sha512')}"
    for ref in ("v1", sha(raw, "sha512")):
        resp = client.get(f"/v2/app/manifests/{ref}")
        assert (resp.data, resp.headers["Docker-Content-Digest"]) == (raw, sha(raw, "sha512"))
    v2_error(client.get(f"/v2/app/manifests/{sha(raw)}"), 404, "MANIFEST_UNKNOWN")  # not stored under sha256

    # by sha512 digest with tag parameters (how the draft tags non-canonical digests)
    raw2 = manifest_bytes(config, layers, OCI_MANIFEST).replace(DOCKER_CONFIG.encode(), OCI_CONFIG.encode())
    resp = client.put(f"/v2/app/manifests/{sha(raw2, 'sha512')}?tag=v2", data=raw2,
                      headers={"Content-Type": OCI_MANIFEST})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["OCI-Tag"] == "v2"
    assert client.head("/v2/app/manifests/v2").headers["Docker-Content-Digest"] == sha(raw2, "sha512")

    before = rows(app)
    v2_error(client.put(f"/v2/app/manifests/v3?digest={sha(b'other', 'sha512')}", data=raw,
                        headers={"Content-Type": DOCKER_MANIFEST}), 400, "DIGEST_INVALID")
    v2_error(client.put("/v2/app/manifests/v3?digest=sha512:abc", data=raw,
                        headers={"Content-Type": DOCKER_MANIFEST}), 400, "DIGEST_INVALID")
    v2_error(client.put(f"/v2/app/manifests/{sha(raw, 'sha512')}?digest={sha(raw)}", data=raw,
                        headers={"Content-Type": DOCKER_MANIFEST}), 400, "DIGEST_INVALID")
    assert rows(app) == before
    record("conformance", "PUT /v2/<name>/manifests/<tag>?digest=sha512:... and <sha512 digest>?tag=v2",
           "stored and tagged under the sha512 digest, Docker-Content-Digest and Location say sha512; a digest "
           "the bytes do not have: 400 DIGEST_INVALID, nothing stored")


# -- non-distributable (foreign) layers ------------------------------------------------------------------------
def test_foreign_layers_are_accepted_without_their_blobs(client, app):
    tars = [layer_tar(b"foreign"), layer_tar(b"ours")]
    ours = gzip.compress(tars[1], mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "windows", "created": "2025-03-04T05:06:07Z",
                         "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]}}).encode()
    upload(client, ours)
    upload(client, config)
    foreign = gzip.compress(tars[0], mtime=0)  # never pushed
    url = f"https://mcr.example.invalid/blobs/{sha(foreign)}"
    for media, layer_type, config_type in ((DOCKER_MANIFEST, DOCKER_FOREIGN, DOCKER_CONFIG),
                                           (OCI_MANIFEST, OCI_NONDIST, OCI_CONFIG)):
        raw = manifest_bytes(desc(config_type, config), [desc(layer_type, foreign, urls=[url]),
                                                         desc(GZIP_LAYER if media == DOCKER_MANIFEST
                                                              else OCI_GZIP_LAYER, ours)], media)
        tag = "docker" if media == DOCKER_MANIFEST else "oci"
        resp = client.put(f"/v2/win/manifests/{tag}", data=raw, headers={"Content-Type": media})
        assert resp.status_code == 201, resp.get_data(as_text=True)
        assert client.get(f"/v2/win/manifests/{tag}").data == raw
        rec = client.get(f"/api/v1/repositories/win/tags/{tag}").get_json()
        assert rec["format"] == "artifact" and "layers" not in rec  # no torrents, no seeders: docket refuses it
    assert sha(foreign) not in rows(app)[0]
    with app.extensions["docket"].db.session() as s:
        assert {b.digest: b.info_hash for b in s.query(Blob)}[sha(ours)] is None  # not promoted, not seeded

    before = rows(app)
    bad = [([desc(DOCKER_FOREIGN, foreign)], DOCKER_MANIFEST, DOCKER_CONFIG, 400, "MANIFEST_INVALID"),  # no urls
           ([desc(OCI_NONDIST, foreign)], OCI_MANIFEST, OCI_CONFIG, 404, "MANIFEST_BLOB_UNKNOWN"),  # then: a blob
           ([desc(OCI_NONDIST, foreign, urls=["file:///etc/passwd"])], OCI_MANIFEST, OCI_CONFIG, 400,
            "MANIFEST_INVALID"),
           ([desc(OCI_NONDIST, foreign, urls=[url + "#frag"])], OCI_MANIFEST, OCI_CONFIG, 400, "MANIFEST_INVALID"),
           ([desc(GZIP_LAYER, foreign, urls=[url])], DOCKER_MANIFEST, DOCKER_CONFIG, 404,
            "MANIFEST_BLOB_UNKNOWN")]  # urls on an ordinary layer do not excuse the blob
    for layers, media, config_type, status, code in bad:
        raw = manifest_bytes(desc(config_type, config), layers, media)
        v2_error(client.put("/v2/win/manifests/bad", data=raw, headers={"Content-Type": media}), status, code)
    assert rows(app) == before
    record("conformance", "a manifest with non-distributable (foreign) layers that have urls, blobs not pushed",
           "201 (Docker foreign and OCI nondistributable); no torrent or seeder, tag is an artifact docket refuses; "
           "without urls, a file: URL or a fragment: 400/404, nothing stored")


def test_docket_pull_of_an_image_with_foreign_layers_fails_clearly(registry_server, docket_cli, tmp_path):
    url = registry_server.url
    tars = [layer_tar(b"foreign"), layer_tar(b"ours")]
    ours = gzip.compress(tars[1], mtime=0)
    foreign = gzip.compress(tars[0], mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2025-03-04T05:06:07Z",
                         "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]}}).encode()
    for data in (ours, config):
        r = requests.post(f"{url}/v2/fl/blobs/uploads/", params={"digest": sha(data)}, data=data, timeout=30)
        assert r.status_code == 201, r.text
    raw = manifest_bytes(desc(OCI_CONFIG, config), [desc(OCI_NONDIST, foreign, urls=["https://x.invalid/l"]),
                                                    desc(OCI_GZIP_LAYER, ours)], OCI_MANIFEST)
    r = requests.put(f"{url}/v2/fl/manifests/v1", data=raw, headers={"Content-Type": OCI_MANIFEST}, timeout=30)
    assert r.status_code == 201, r.text
    out = tmp_path / "client"
    result = docket_cli("pull", "--no-load", "fl:v1", registry=registry_server, location=out, check=False,
                        timeout=120)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "non-distributable" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not any(p.is_file() for p in out.rglob("*") if "blobs" in p.parts), sorted(out.rglob("*"))
    record("conformance", "docket pull of an image with a non-distributable layer",
           "exit 2 before any download: the image's layers are not all in the registry (non-distributable); "
           "use docker pull; no blob written")


# -- DELETE codes -------------------------------------------------------------------------------------------------
def test_deletes_of_referenced_content_answer_codes_the_spec_allows(client, app):
    config, layers, _ = image(client, [b"del"])
    child = manifest_bytes(config, layers)
    assert client.put(f"/v2/app/manifests/{sha(child)}", data=child,
                      headers={"Content-Type": DOCKER_MANIFEST}).status_code == 201
    parent = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                         "manifests": [desc(DOCKER_MANIFEST, child, platform={"os": "linux",
                                                                              "architecture": "amd64"})]}).encode()
    assert client.put("/v2/app/manifests/v1", data=parent, headers={"Content-Type": OCI_INDEX}).status_code == 201
    before = rows(app)
    resp = client.delete(f"/v2/app/manifests/{sha(child)}")
    err = v2_error(resp, 405, "UNSUPPORTED")
    assert err["detail"]["indexes"] == [sha(parent)] and "delete the index first" in err["message"]
    assert resp.headers["Allow"] == "GET, HEAD, PUT"
    for blob in (layers[0]["digest"], config["digest"]):
        resp = client.delete(f"/v2/app/blobs/{blob}")
        err = v2_error(resp, 405, "UNSUPPORTED")
        assert err["detail"]["references"] >= 1 and resp.headers["Allow"] == "GET, HEAD"
    assert rows(app) == before and client.get(f"/v2/app/manifests/{sha(child)}").data == child
    v2_error(client.delete(f"/v2/app/blobs/{sha(b'never')}"), 404, "BLOB_UNKNOWN")
    # in order, every delete is a 202
    assert client.delete(f"/v2/app/manifests/{sha(parent)}").status_code == 202
    assert client.delete(f"/v2/app/manifests/{sha(child)}").status_code == 202
    assert client.delete(f"/v2/app/blobs/{layers[0]['digest']}").status_code == 202
    record("conformance", "DELETE of a manifest an index lists, and of blobs a manifest lists",
           "405 UNSUPPORTED with Allow and a hint (was 409), nothing deleted; 202 once unreferenced; unknown: 404")


# -- GC: a push in progress, and waits nobody can stretch forever -------------------------------------------------
def test_gc_keeps_the_blobs_of_a_push_in_progress(client, app):
    sv = app.extensions["docket"]
    config, layers, _ = image(client, [b"early"])
    session = client.post("/v2/app/blobs/uploads/").headers["Location"]  # a big layer still uploading
    later = utcnow() + timedelta(minutes=30)  # far past --gc-grace (600 s)
    assert sv.gc.run_once(now=later) == []
    assert sv.gc.run_once(now=utcnow() + timedelta(hours=7)) != []  # but at most PUSH_MAX_HOLD (6 h)
    config, layers, _ = image(client, [b"again"])
    assert client.delete(session).status_code == 204  # the push ends (no manifest): the grace alone counts
    deleted = sv.gc.run_once(now=utcnow() + timedelta(minutes=30))
    assert sorted(deleted) == sorted([config["digest"], layers[0]["digest"]])
    record("gc", "blobs uploaded 30 min (grace 10 min) before their manifest while the push goes on",
           "kept while uploads go on (at most 6 h), collected once the push stops without a manifest")


def test_gc_does_not_wait_forever_for_a_download(client, app):
    """A trickled HTTP download (or an announce to the tracker: the same wait) must not pin a blob forever; the
    download already running keeps the file it opened."""
    sv = app.extensions["docket"]
    data = bytes(range(256)) * 600
    digest = upload(client, data)
    resp = client.get(f"/v2/app/blobs/{digest}", buffered=False)  # never read further: a slow reader
    t0 = utcnow() + timedelta(hours=1)
    assert sv.gc.run_once(now=t0) == []  # downloading: later
    assert sv.gc.run_once(now=t0 + timedelta(minutes=59)) == []
    assert sv.gc.run_once(now=t0 + timedelta(minutes=61)) == [digest]  # MAX_WAIT (1 h) later: deleted anyway
    assert b"".join(resp.response) == data
    resp.close()
    record("gc", "a blob kept busy by a download (HTTP or swarm) that never ends",
           "GC waits at most 1 h, then deletes it; the running download still gets every byte")


def test_gc_swarm_wait_is_bounded(app, monkeypatch):
    """An anonymous announce makes the tracker report an incomplete peer: unit test of GC's decision with the
    scrape answer substituted (a real announce cannot be aged by an hour in a test)."""

    sv = app.extensions["docket"]
    monkeypatch.setattr(sv.swarm, "seeding", True)  # GC then asks the swarm

    class Busy:
        incomplete, complete, downloaded = 1, 0, 0

    monkeypatch.setattr(sv.swarm.tracker, "scrape", lambda info_hash: Busy())
    with sv.store.upload() as up:
        up.write(b"x" * 5000)
        up.finish()
        sv.blobs.store_upload(up, "layer")
    digest = sha(b"x" * 5000)
    with sv.db.session() as s:
        assert s.get(Blob, digest).info_hash is not None
    t0 = utcnow() + timedelta(hours=1)
    assert sv.gc.run_once(now=t0) == []
    assert sv.gc.run_once(now=t0 + timedelta(minutes=61)) == [digest]
    record("gc", "an anonymous announce (left > 0) repeated forever for an unreferenced layer",
           "GC waits at most 1 h for the swarm, then removes seeder, whitelist entry and blob")


def test_anonymous_head_does_not_renew_a_blobs_grace(make_app):
    """With push tokens, a HEAD renews an unreferenced blob's grace only for a client that may push (docker's
    check before it skips an upload); an anonymous HEAD every few minutes must not keep it forever."""
    app = make_app(auth_tokens=("push-secret",))
    sv = app.extensions["docket"]
    client = app.test_client()
    push = {"Authorization": "Bearer push-secret"}
    blobs = [b"checked by a pusher", b"checked anonymously"]
    for data in blobs:
        resp = client.post(f"/v2/app/blobs/uploads/?digest={sha(data)}", data=data, headers=push)
        assert resp.status_code == 201, resp.get_data(as_text=True)
    old = utcnow() - timedelta(hours=1)
    with sv.db.session() as s:
        for data in blobs:
            s.get(Blob, sha(data)).unreferenced_at = old
        s.commit()
    resp = client.head(f"/v2/app/blobs/{sha(blobs[0])}", headers=push)
    assert resp.status_code == 200
    resp.close()
    for _ in range(3):
        resp = client.head(f"/v2/app/blobs/{sha(blobs[1])}")
        assert resp.status_code == 200  # reads are open
        resp.close()
    try:
        assert sv.gc.run_once(now=utcnow() + timedelta(minutes=5)) == [sha(blobs[1])]
    finally:
        sv.db.dispose()
    record("gc", "anonymous HEAD of an unreferenced blob, repeated (registry with push tokens)",
           "does not renew its grace: collected; a HEAD with a push token renews it (docker's pre-push check)")


def test_gc_grace_below_the_minimum_is_refused_up_front(tmp_path):
    location = tmp_path / "registry"
    server = RegistryServer(location=location, port=free_port(), tracker_port=free_port(),
                            log=tmp_path / "r.log", extra_args=["--no-seeding", "--gc-grace", "0"])
    result = subprocess.run(server.args(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "docket-registry: error:" in line]
    assert len(lines) == 1 and "--gc-grace 0 is shorter than a push can take" in lines[0], result.stderr
    assert "hint: use --gc-grace 60" in result.stderr and "Traceback" not in result.stderr
    assert not location.exists()
    record("gc", "docket-registry --gc-grace 0",
           "refused at start: one 'docket-registry: error:' line (shorter than a push can take) and a hint, nothing "
           "created")


def test_push_outlasting_the_grace_succeeds_on_a_real_registry(tmp_path):
    """A real registry, GC every second, the minimum grace (60 s): config and one layer uploaded first, a second
    layer trickled for longer than the grace (a big layer on a slow link), then the manifest: 201. A blob made
    unreferenced an hour ago (set in the database before start) is collected meanwhile: GC was running."""
    location = tmp_path / "registry"
    extra = ["--no-seeding", "--gc-interval", "1", "--gc-grace", "60"]
    server = RegistryServer(location=location, port=free_port(), tracker_port=free_port(),
                            log=tmp_path / "registry.log", extra_args=extra)
    server.start()
    old = b"old and unreferenced"
    r = requests.post(f"{server.url}/v2/app/blobs/uploads/", params={"digest": sha(old)}, data=old, timeout=30)
    assert r.status_code == 201
    server.stop()
    with sqlite3.connect(location / "docket.db") as db:
        db.execute("UPDATE blobs SET unreferenced_at = datetime('now', '-1 hour') WHERE digest = ?", (sha(old),))
    server.start()
    try:
        url = server.url
        tars = [layer_tar(b"first"), layer_tar(b"big" * 1000)]
        blobs = [gzip.compress(t, mtime=0) for t in tars]
        config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2025-03-04T05:06:07Z",
                             "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]}}).encode()
        for data in (config, blobs[0]):
            r = requests.post(f"{url}/v2/app/blobs/uploads/", params={"digest": sha(data)}, data=data, timeout=30)
            assert r.status_code == 201, r.text
        wait_until(lambda: requests.get(f"{url}/v2/app/blobs/{sha(old)}", timeout=10).status_code == 404,
                   timeout=30, what="GC collecting the blob unreferenced an hour ago")
        started = time.monotonic()
        location_hdr = requests.post(f"{url}/v2/app/blobs/uploads/", timeout=30).headers["Location"]
        big, sent, step = blobs[1], 0, max(len(blobs[1]) // 8, 1)
        while time.monotonic() - started < 75:  # longer than --gc-grace, one chunk every ~9 s
            chunk = big[sent:sent + step] if sent + step < len(big) else b""
            if chunk:
                r = requests.patch(f"{url}{location_hdr}", data=chunk, timeout=30,
                                   headers={"Content-Range": f"{sent}-{sent + len(chunk) - 1}",
                                            "Content-Type": "application/octet-stream"})
                assert r.status_code == 202, r.text
                sent += len(chunk)
            time.sleep(9)
        r = requests.put(f"{url}{location_hdr}", params={"digest": sha(big)}, data=big[sent:], timeout=30,
                         headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 201, r.text
        raw = manifest_bytes(desc(DOCKER_CONFIG, config), [desc(GZIP_LAYER, b) for b in blobs])
        r = requests.put(f"{url}/v2/app/manifests/v1", data=raw, headers={"Content-Type": DOCKER_MANIFEST},
                         timeout=30)
        assert r.status_code == 201, r.text
        for data in (config, *blobs):
            assert requests.get(f"{url}/v2/app/blobs/{sha(data)}", timeout=30).content == data
    finally:
        server.stop()
    record("gc", "a real push whose manifest comes 75 s after its first blobs, --gc-grace 60, GC every 1 s",
           "manifest 201 with every blob still there; a blob unreferenced for an hour was collected meanwhile")
