"""V2 / OCI manifests, tags, catalog and referrers (docs/v2.md) through Flask's test client, seeding disabled.

Blobs are stored with ``Blobs.store_upload`` (as a V2 upload does, kind "blob"), so these tests do not depend on
the upload routes; the docket-push test fetches blobs through ``GET /v2/<name>/blobs/<digest>``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select

from docket.registry.models import Blob, Image, Manifest, utcnow
from tests.support.registry_images import layer_tar

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
GZIP_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
EMPTY = "application/vnd.oci.empty.v1+json"


pytestmark = [pytest.mark.registry_config(max_upload_size=1 << 20), pytest.mark.databases("sqlite", "postgresql")]


def sha(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def store(app: Flask, data: bytes, kind: str = "blob") -> dict[str, Any]:
    """A blob as a V2 upload stores it; returns its descriptor fields."""
    sv = app.extensions["docket"]
    with sv.store.upload() as up:
        up.write(data)
        up.finish()
        sv.blobs.store_upload(up, kind)
    return {"digest": sha(data), "size": len(data)}


def desc(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha(data), "size": len(data), **extra}


def image_blobs(app: Flask, payloads: list[bytes], compress: bool = True, config_type: str = DOCKER_CONFIG,
                layer_type: str = GZIP_LAYER, created: str = "2025-03-04T05:06:07Z") -> tuple[dict, list[dict], bytes]:
    """Layers (gzip: digest != diff_id) and an image config listing their diff_ids, all stored."""
    tars = [layer_tar(p) for p in payloads]
    blobs = [gzip.compress(t, mtime=0) if compress else t for t in tars]
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": created,
                         "rootfs": {"type": "layers", "diff_ids": [sha(t) for t in tars]}}).encode()
    for b in (*blobs, config):
        store(app, b)
    return desc(config_type, config), [desc(layer_type, b) for b in blobs], config


def manifest(config: dict, layers: list[dict], media_type: str | None = DOCKER_MANIFEST, **extra: Any) -> bytes:
    body: dict[str, Any] = {"schemaVersion": 2}
    if media_type:
        body["mediaType"] = media_type
    body.update(config=config, layers=layers, **extra)
    return json.dumps(body, indent=2).encode()


def index(children: list[tuple[str, bytes]], media_type: str | None = OCI_INDEX, **extra: Any) -> bytes:
    body: dict[str, Any] = {"schemaVersion": 2}
    if media_type:
        body["mediaType"] = media_type
    body["manifests"] = [desc(t, raw, platform={"architecture": "amd64", "os": "linux"}) for t, raw in children]
    body.update(extra)
    return json.dumps(body).encode()


def put(client: FlaskClient, name: str, reference: str, raw: bytes, content_type: str | None = DOCKER_MANIFEST):
    headers = {"Content-Type": content_type} if content_type else {}
    return client.put(f"/v2/{name}/manifests/{reference}", data=raw, headers=headers)


def ok_put(client: FlaskClient, name: str, reference: str, raw: bytes, content_type: str | None = DOCKER_MANIFEST,
           algorithm: str = "sha256"):
    resp = put(client, name, reference, raw, content_type)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["Docker-Content-Digest"] == sha(raw, algorithm)
    assert resp.headers["Location"] == f"/v2/{name}/manifests/{sha(raw, algorithm)}"
    return resp


def v2_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert [e["code"] for e in body["errors"]] == [code], body
    assert set(body["errors"][0]) == {"code", "message", "detail"}
    return body["errors"][0]


def record(client: FlaskClient, ref: str) -> dict:
    repo, _, tag = ref.rpartition(":")
    resp = client.get(f"/api/v1/repositories/{repo}/tags/{tag}")
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.get_json()


def blob_row(app: Flask, digest: str) -> Blob | None:
    with app.extensions["docket"].db.session() as s:
        return s.get(Blob, digest)


def manifest_row(app: Flask, name: str, digest: str) -> Manifest | None:
    with app.extensions["docket"].db.session() as s:
        return s.scalars(select(Manifest).where(Manifest.repository == name, Manifest.digest == digest)).one_or_none()


# -- push and pull --------------------------------------------------------------------------------------------
def test_docker_schema2_by_tag_get_head_and_record(app, client):
    config, layers, config_raw = image_blobs(app, [b"base", b"app"])
    raw = manifest(config, layers)
    ok_put(client, "team/app", "v1", raw)
    digest = sha(raw)
    for ref in ("v1", digest):
        resp = client.get(f"/v2/team/app/manifests/{ref}")
        assert resp.status_code == 200 and resp.data == raw
        assert resp.headers["Content-Type"] == DOCKER_MANIFEST
        assert resp.headers["Docker-Content-Digest"] == digest and resp.headers["ETag"] == f'"{digest}"'
        assert int(resp.headers["Content-Length"]) == len(raw)
        head = client.head(f"/v2/team/app/manifests/{ref}")
        assert head.status_code == 200 and head.data == b"" and int(head.headers["Content-Length"]) == len(raw)
        assert head.headers["Docker-Content-Digest"] == digest
    rec = record(client, "team/app:v1")
    assert rec["format"] == "layers" and rec["digest"] == rec["manifest_digest"] == digest
    assert rec["media_type"] == DOCKER_MANIFEST
    assert rec["image_id"] == rec["config"]["digest"] == config["digest"] and rec["created"] == "2025-03-04T05:06:07Z"
    assert rec["size"] == config["size"] + sum(x["size"] for x in layers)
    diff_ids = json.loads(config_raw)["rootfs"]["diff_ids"]
    for entry, layer, diff_id in zip(rec["layers"], layers, diff_ids, strict=True):
        assert entry["digest"] == layer["digest"] != entry["diff_id"] == diff_id
        assert entry["media_type"] == GZIP_LAYER and entry["size"] == layer["size"]
        assert len(entry["info_hash"]) == 40 and entry["torrent_url"] == f"/api/v1/blobs/{layer['digest']}/torrent"
        assert blob_row(app, layer["digest"]).kind == "layer"  # promoted from "blob": torrent + seeder
        with client.get(entry["torrent_url"]) as torrent:
            assert torrent.status_code == 200
    assert blob_row(app, config["digest"]).kind == "blob" and blob_row(app, digest).kind == "manifest"
    for d in (digest, config["digest"], *(x["digest"] for x in layers)):
        assert blob_row(app, d).unreferenced_at is None
    assert client.get("/api/v1/images").get_json() == {"images": [rec]}
    assert manifest_row(app, "team/app", digest).origin == "v2"


def test_oci_manifest_without_media_type_field(app, client):
    config, layers, _ = image_blobs(app, [b"oci"], compress=False, config_type=OCI_CONFIG, layer_type=OCI_LAYER)
    raw = manifest(config, layers, media_type=None, annotations={"org.example": "x"})
    ok_put(client, "oci/app", "latest", raw, OCI_MANIFEST)
    assert client.get("/v2/oci/app/manifests/latest").headers["Content-Type"] == OCI_MANIFEST
    rec = record(client, "oci/app:latest")
    assert rec["format"] == "layers" and rec["media_type"] == OCI_MANIFEST
    [entry] = rec["layers"]
    assert entry["diff_id"] == entry["digest"] and entry["media_type"] == OCI_LAYER  # uncompressed: the same
    # no Content-Type at all: the shape of the body tells
    other = manifest(config, layers, media_type=None, annotations={"n": "2"})
    ok_put(client, "oci/app", "guessed", other, None)
    assert client.get("/v2/oci/app/manifests/guessed").headers["Content-Type"] == OCI_MANIFEST


def test_nested_index(app, client):
    c1, l1, _ = image_blobs(app, [b"amd64"])
    c2, l2, _ = image_blobs(app, [b"arm64"], config_type=OCI_CONFIG, layer_type=OCI_LAYER, compress=False)
    m1, m2 = manifest(c1, l1), manifest(c2, l2, OCI_MANIFEST)
    ok_put(client, "multi", sha(m1), m1)
    ok_put(client, "multi", sha(m2), m2, OCI_MANIFEST)
    inner = index([(DOCKER_MANIFEST, m1), (OCI_MANIFEST, m2)], DOCKER_LIST)
    ok_put(client, "multi", sha(inner), inner, DOCKER_LIST)
    outer = index([(DOCKER_LIST, inner), (OCI_MANIFEST, m2)], annotations={"org.opencontainers.image.created":
                                                                          "2025-05-05T00:00:00Z"})
    ok_put(client, "multi", "v1", outer, OCI_INDEX)
    assert client.get("/v2/multi/manifests/v1").data == outer
    assert client.get(f"/v2/multi/manifests/{sha(inner)}").headers["Content-Type"] == DOCKER_LIST
    rec = record(client, "multi:v1")
    assert rec["format"] == "index" and rec["digest"] == rec["image_id"] == rec["manifest_digest"] == sha(outer)
    assert rec["media_type"] == OCI_INDEX and rec["created"] == "2025-05-05T00:00:00Z"
    assert rec["size"] == len(outer) + len(inner) + len(m2)
    assert rec["manifest_url"] == f"/v2/multi/manifests/{sha(outer)}" and "layers" not in rec
    # children pushed by digest only are not tags; their layers are not seeded (docket cannot pull an index)
    assert client.get("/v2/multi/tags/list").get_json() == {"name": "multi", "tags": ["v1"]}
    assert blob_row(app, l1[0]["digest"]).kind == "blob"
    # an index whose child lives in another repository: refused
    v2_error(put(client, "elsewhere", "v1", outer, OCI_INDEX), 404, "MANIFEST_BLOB_UNKNOWN")


def test_artifact_with_artifact_type_custom_fields_and_empty_layers(app, client):
    store(app, b"{}")
    sbom = b'{"spdxVersion": "SPDX-2.3"}'
    store(app, sbom)
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sbom",
                      "config": desc(EMPTY, b"{}"), "layers": [desc("application/spdx+json", sbom)],
                      "x-custom": {"anything": [1, 2, 3]}, "annotations": {"a": "b"}}).encode()
    ok_put(client, "art", "sbom", raw, OCI_MANIFEST)
    rec = record(client, "art:sbom")
    assert rec["format"] == "artifact" and rec["image_id"] == rec["digest"] == sha(raw)
    assert rec["artifact_type"] == "application/vnd.example.sbom" and rec["media_type"] == OCI_MANIFEST
    assert rec["size"] == len(raw) + 2 + len(sbom) and rec["created"] is None
    assert blob_row(app, sha(sbom)).kind == "blob"  # not a layer: no torrent
    # empty layer list, config of an unknown type, no artifactType: an artifact too
    empty = manifest(desc("application/vnd.example.config", b"{}"), [], OCI_MANIFEST)
    ok_put(client, "art", "empty", empty, OCI_MANIFEST)
    assert record(client, "art:empty")["artifact_type"] == "application/vnd.example.config"
    # an image config whose diff_ids do not match the layers: served, but an artifact for docket
    config, layers, _ = image_blobs(app, [b"one", b"two"])
    ok_put(client, "art", "mismatch", manifest(config, layers[:1]))
    assert record(client, "art:mismatch")["format"] == "artifact"
    assert [i["ref"] for i in client.get("/api/v1/images").get_json()["images"]] == \
        ["art:empty", "art:mismatch", "art:sbom"]


def test_image_without_layers(app, client):
    config = json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    store(app, config)
    ok_put(client, "scratch", "v1", manifest(desc(DOCKER_CONFIG, config), []))
    rec = record(client, "scratch:v1")
    assert rec["format"] == "layers" and rec["layers"] == [] and rec["size"] == len(config)


def test_zero_byte_layer_is_not_seeded(app, client):
    """torf cannot make a torrent of an empty file: the blob stays unseeded, the record says so (info_hash null)."""
    config = json.dumps({"os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(b""), sha(layer_tar(b"x"))]}})
    store(app, b"")
    store(app, layer_tar(b"x"))
    store(app, config.encode())
    raw = manifest(desc(DOCKER_CONFIG, config.encode()),
                   [desc(OCI_LAYER, b""), desc(OCI_LAYER, layer_tar(b"x"))], OCI_MANIFEST)
    ok_put(client, "empty", "v1", raw, OCI_MANIFEST)
    empty, full = record(client, "empty:v1")["layers"]
    assert empty["size"] == 0 and empty["info_hash"] is None and empty["torrent_url"] is None
    assert empty["blob_url"] == f"/api/v1/blobs/{sha(b'')}"
    assert blob_row(app, sha(b"")).kind == "blob" and blob_row(app, sha(b"")).info_hash is None
    assert len(full["info_hash"]) == 40


def test_sha512_manifest_by_digest(app, client):
    config, layers, _ = image_blobs(app, [b"512"])
    raw = manifest(config, layers)
    digest = sha(raw, "sha512")
    ok_put(client, "big", digest, raw, algorithm="sha512")
    resp = client.get(f"/v2/big/manifests/{digest}")
    assert resp.status_code == 200 and resp.data == raw and resp.headers["Docker-Content-Digest"] == digest
    assert blob_row(app, digest).kind == "manifest"
    assert (app.extensions["docket"].store.local_path(digest)).parent.name == "sha512"
    v2_error(put(client, "big", "sha512:" + "0" * 128, raw), 400, "DIGEST_INVALID")
    v2_error(put(client, "big", sha(raw + b" "), raw), 400, "DIGEST_INVALID")


def test_get_errors(app, client):
    config, layers, _ = image_blobs(app, [b"x"])
    raw = manifest(config, layers)
    ok_put(client, "one", "v1", raw)
    v2_error(client.get("/v2/one/manifests/nope"), 404, "MANIFEST_UNKNOWN")
    v2_error(client.get(f"/v2/two/manifests/{sha(raw)}"), 404, "MANIFEST_UNKNOWN")  # stored, but in "one"
    v2_error(client.get(f"/v2/one/manifests/{sha(b'other')}"), 404, "MANIFEST_UNKNOWN")
    assert client.head("/v2/one/manifests/nope").status_code == 404
    v2_error(client.get("/v2/one/manifests/sha256:abc"), 400, "DIGEST_INVALID")
    v2_error(client.get("/v2/one/manifests/-bad"), 400, "MANIFEST_INVALID")
    v2_error(client.get("/v2/One/manifests/v1"), 400, "NAME_INVALID")
    # a tag pushed as one whole tarball before layers (format "tarball"): no manifest, re-push
    tarball = store(app, b"a whole docker save tarball")
    with app.extensions["docket"].db.session() as s:
        s.add(Image(repository="old", tag="v1", image_id=sha(b"cfg"), size=tarball["size"], format="tarball",
                    blob_digest=tarball["digest"]))
        s.commit()
    err = v2_error(client.get("/v2/old/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    assert "push it again" in err["message"]


BAD = "sha256:" + "e" * 64


@pytest.mark.parametrize("case", ["unknown-layer", "unknown-config", "bad-json", "not-object", "type-mismatch",
                                  "schema1-type", "schema1-body", "unknown-type", "version", "no-config",
                                  "bad-descriptor", "bad-descriptor-digest", "size-mismatch", "bad-annotations",
                                  "index-without-manifests", "unknown-child", "too-large",
                                  "bad-name", "bad-tag", "bad-digest"])
def test_put_errors(app, client, location, case):
    config, layers, _ = image_blobs(app, [b"e"])
    good = manifest(config, layers)
    name, ref, ctype = "err", "v1", DOCKER_MANIFEST
    expect = (400, "MANIFEST_INVALID")
    raw = good
    if case == "unknown-layer":
        raw, expect = manifest(config, [*layers, {"mediaType": GZIP_LAYER, "digest": BAD, "size": 3}]), \
            (404, "MANIFEST_BLOB_UNKNOWN")
    elif case == "unknown-config":
        raw, expect = manifest({**config, "digest": BAD}, layers), (404, "MANIFEST_BLOB_UNKNOWN")
    elif case == "bad-json":
        raw = b'{"schemaVersion": 2,'
    elif case == "not-object":
        raw = b"[1, 2]"
    elif case == "type-mismatch":
        ctype = OCI_MANIFEST
    elif case == "schema1-type":
        ctype, expect = "application/vnd.docker.distribution.manifest.v1+prettyjws", (415, "UNSUPPORTED")
    elif case == "schema1-body":
        raw = json.dumps({"schemaVersion": 1, "name": "err", "tag": "v1", "fsLayers": []}).encode()
        ctype = "application/json"
    elif case == "unknown-type":
        ctype, expect = "text/plain", (415, "UNSUPPORTED")
    elif case == "version":
        raw = json.dumps({**json.loads(good), "schemaVersion": 3}).encode()
    elif case == "no-config":
        raw = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "layers": layers}).encode()
    elif case == "bad-descriptor":
        raw = manifest(config, [{"digest": layers[0]["digest"], "size": 1}])
    elif case == "bad-descriptor-digest":
        raw = manifest(config, [{**layers[0], "digest": "md5:abc"}])
    elif case == "size-mismatch":
        raw = manifest(config, [{**layers[0], "size": layers[0]["size"] + 1}])
    elif case == "bad-annotations":
        raw = manifest(config, layers, annotations={"a": 1})
    elif case == "index-without-manifests":
        raw, ctype = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX}).encode(), OCI_INDEX
    elif case == "unknown-child":
        raw, ctype, expect = index([(DOCKER_MANIFEST, good)]), OCI_INDEX, (404, "MANIFEST_BLOB_UNKNOWN")
    elif case == "too-large":
        raw = manifest(config, layers, annotations={"pad": "x" * (4 * 1024 * 1024)})
        expect = (413, "MANIFEST_INVALID")
    elif case == "bad-name":
        name, expect = "Bad/Name", (400, "NAME_INVALID")
    elif case == "bad-tag":
        ref = ".hidden"
    elif case == "bad-digest":
        ref, expect = "sha384:" + "a" * 96, (400, "DIGEST_INVALID")
    if case == "type-mismatch":
        raw = manifest(config, layers)  # body says docker, header says OCI
    before = sorted(p.name for p in (location / "blobs" / "sha256").iterdir())
    resp = put(client, name, ref, raw, ctype)
    err = v2_error(resp, *expect)
    if expect[1] == "MANIFEST_BLOB_UNKNOWN":
        assert err["detail"]["digest"] in err["message"]
    if case.startswith("schema1"):
        assert "schema 1" in err["message"]
    assert sorted(p.name for p in (location / "blobs" / "sha256").iterdir()) == before  # nothing stored
    assert client.get("/v2/_catalog").get_json() == {"repositories": []}


def test_size_limit_holds_without_content_length():
    """A chunked body is read up to the limit, then parsed: 4 MiB is accepted, one byte more is not."""
    from docket.errors import ManifestTooLarge
    from docket.registry.oci import MAX_MANIFEST_BYTES, parse_manifest

    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [], "annotations": {"pad": ""}})
    pad = MAX_MANIFEST_BYTES - len(body)
    at_limit = body.replace('"pad": ""', '"pad": "' + "x" * pad + '"').encode()
    assert len(at_limit) == MAX_MANIFEST_BYTES and parse_manifest(at_limit, OCI_INDEX).size == MAX_MANIFEST_BYTES
    with pytest.raises(ManifestTooLarge):
        parse_manifest(at_limit + b" ", OCI_INDEX)


# -- subject and referrers ------------------------------------------------------------------------------------
def test_subject_and_referrers(app, client):
    config, layers, _ = image_blobs(app, [b"subject"])
    subject = manifest(config, layers, OCI_MANIFEST)
    ok_put(client, "ref", "v1", subject, OCI_MANIFEST)
    store(app, b"{}")
    sig, sbom = b"a signature", b"an sbom"
    store(app, sig)
    store(app, sbom)
    subj = desc(OCI_MANIFEST, subject)

    def artifact(artifact_type: str | None, blob: bytes, **extra: Any) -> bytes:
        body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc(EMPTY, b"{}"),
                "layers": [desc("application/octet-stream", blob)], "subject": subj, **extra}
        if artifact_type:
            body["artifactType"] = artifact_type
        return json.dumps(body).encode()

    a1 = artifact("application/vnd.example.sig", sig, annotations={"org.example.signer": "me"})
    a2 = artifact(None, sbom)  # artifactType from the config's mediaType
    for raw in (a1, a2):
        resp = ok_put(client, "ref", sha(raw), raw, OCI_MANIFEST)
        assert resp.headers["OCI-Subject"] == sha(subject)
    idx = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [], "subject": subj}).encode()
    ok_put(client, "ref", sha(idx), idx, OCI_INDEX)
    resp = client.get(f"/v2/ref/referrers/{sha(subject)}")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == OCI_INDEX
    assert "OCI-Filters-Applied" not in resp.headers
    assert resp.get_json() == {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": OCI_MANIFEST, "digest": sha(a1), "size": len(a1), "artifactType": "application/vnd.example.sig",
         "annotations": {"org.example.signer": "me"}},
        {"mediaType": OCI_MANIFEST, "digest": sha(a2), "size": len(a2), "artifactType": EMPTY},
        {"mediaType": OCI_INDEX, "digest": sha(idx), "size": len(idx)},  # an index without artifactType: none
    ]}
    filtered = client.get(f"/v2/ref/referrers/{sha(subject)}?artifactType=application/vnd.example.sig")
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    assert [m["digest"] for m in filtered.get_json()["manifests"]] == [sha(a1)]
    nothing = client.get(f"/v2/ref/referrers/{sha(subject)}?artifactType=application/none")
    assert nothing.get_json()["manifests"] == [] and nothing.headers["OCI-Filters-Applied"] == "artifactType"
    # none, unknown subject, other repository: 200 with an empty list
    for url in (f"/v2/ref/referrers/{sha(a1)}", f"/v2/ref/referrers/{BAD}", f"/v2/other/referrers/{sha(subject)}"):
        resp = client.get(url)
        assert resp.status_code == 200 and resp.get_json()["manifests"] == [], url
    v2_error(client.get("/v2/ref/referrers/sha256:xyz"), 400, "DIGEST_INVALID")
    # the subject need not exist; deleting a subject keeps its referrers
    orphan = artifact("application/vnd.example.sig", sig, subject={**subj, "digest": BAD})
    assert ok_put(client, "ref", "orphan", orphan, OCI_MANIFEST).headers["OCI-Subject"] == BAD
    assert [m["digest"] for m in client.get(f"/v2/ref/referrers/{BAD}").get_json()["manifests"]] == [sha(orphan)]
    assert client.delete(f"/v2/ref/manifests/{sha(subject)}").status_code == 202
    assert len(client.get(f"/v2/ref/referrers/{sha(subject)}").get_json()["manifests"]) == 3


# -- delete ---------------------------------------------------------------------------------------------------
def test_delete_by_tag_and_by_digest(app, client):
    config, layers, _ = image_blobs(app, [b"del"])
    raw = manifest(config, layers)
    digest = sha(raw)
    ok_put(client, "del", "v1", raw)
    ok_put(client, "del", "v2", raw)
    assert client.delete("/v2/del/manifests/v1").status_code == 202
    v2_error(client.get("/v2/del/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    assert client.get("/v2/del/manifests/v2").status_code == 200
    assert client.get(f"/v2/del/manifests/{digest}").status_code == 200
    v2_error(client.delete("/v2/del/manifests/v1"), 404, "MANIFEST_UNKNOWN")
    # by digest: the manifest and every tag of it
    assert client.delete(f"/v2/del/manifests/{digest}").status_code == 202
    for ref in ("v2", digest):
        v2_error(client.get(f"/v2/del/manifests/{ref}"), 404, "MANIFEST_UNKNOWN")
    v2_error(client.delete(f"/v2/del/manifests/{digest}"), 404, "MANIFEST_UNKNOWN")
    v2_error(client.get("/v2/del/tags/list"), 404, "NAME_UNKNOWN")
    assert client.get("/api/v1/images").get_json() == {"images": []}
    for d in (digest, config["digest"], layers[0]["digest"]):
        assert blob_row(app, d).unreferenced_at is not None
    sv = app.extensions["docket"]
    assert sorted(sv.gc.run_once(now=utcnow() + timedelta(hours=1))) == \
        sorted([digest, config["digest"], layers[0]["digest"]])


def test_untagged_manifest_survives_gc_and_shared_blobs_stay(app, client):
    config, layers, _ = image_blobs(app, [b"keep"])
    raw = manifest(config, layers)
    ok_put(client, "keep", "v1", raw)
    ok_put(client, "copy", "v1", raw)  # same bytes, another repository
    assert client.delete("/v2/keep/manifests/v1").status_code == 202
    sv = app.extensions["docket"]
    assert sv.gc.run_once(now=utcnow() + timedelta(hours=1)) == []
    assert client.get(f"/v2/keep/manifests/{sha(raw)}").status_code == 200  # a V2 manifest stays until DELETE
    assert client.delete(f"/v2/keep/manifests/{sha(raw)}").status_code == 202
    assert blob_row(app, sha(raw)).unreferenced_at is None  # still stored in "copy"
    assert client.get("/v2/copy/manifests/v1").data == raw


def test_delete_child_of_an_index_is_refused(app, client):
    config, layers, _ = image_blobs(app, [b"child"])
    child = manifest(config, layers)
    ok_put(client, "idx", sha(child), child)
    parent = index([(DOCKER_MANIFEST, child)])
    ok_put(client, "idx", "v1", parent, OCI_INDEX)
    resp = client.delete(f"/v2/idx/manifests/{sha(child)}")
    err = v2_error(resp, 405, "UNSUPPORTED")  # a code the spec allows for DELETE (was a 409: issue 11)
    assert err["detail"]["indexes"] == [sha(parent)] and resp.headers["Allow"] == "GET, HEAD, PUT"
    assert client.delete(f"/v2/idx/manifests/{sha(parent)}").status_code == 202
    assert client.delete(f"/v2/idx/manifests/{sha(child)}").status_code == 202


# -- tags list and catalog ------------------------------------------------------------------------------------
def test_tags_list_pagination(app, client):
    config, layers, _ = image_blobs(app, [b"tags"])
    raw = manifest(config, layers)
    for tag in ("b", "a", "Z", "c-1", "c"):
        ok_put(client, "t/app", tag, raw)
    assert client.get("/v2/t/app/tags/list").get_json() == {"name": "t/app", "tags": ["Z", "a", "b", "c", "c-1"]}
    resp = client.get("/v2/t/app/tags/list?n=2")
    assert resp.get_json()["tags"] == ["Z", "a"] and resp.headers["Link"] == '</v2/t/app/tags/list?n=2&last=a>; rel="next"'
    resp = client.get("/v2/t/app/tags/list?n=2&last=a")
    assert resp.get_json()["tags"] == ["b", "c"] and "last=c>" in resp.headers["Link"]
    resp = client.get("/v2/t/app/tags/list?n=2&last=c")
    assert resp.get_json()["tags"] == ["c-1"] and "Link" not in resp.headers
    resp = client.get("/v2/t/app/tags/list?n=5")
    assert len(resp.get_json()["tags"]) == 5 and "Link" not in resp.headers
    assert client.get("/v2/t/app/tags/list?last=b").get_json()["tags"] == ["c", "c-1"]
    resp = client.get("/v2/t/app/tags/list?n=0")
    assert resp.get_json() == {"name": "t/app", "tags": []} and "Link" not in resp.headers
    for bad in ("-1", "x", "1.5"):
        v2_error(client.get(f"/v2/t/app/tags/list?n={bad}"), 400, "PAGINATION_NUMBER_INVALID")
    v2_error(client.get("/v2/nothing/tags/list"), 404, "NAME_UNKNOWN")
    v2_error(client.get("/v2/BAD/tags/list"), 400, "NAME_INVALID")
    # a repository with only untagged manifests exists: empty list
    ok_put(client, "untagged", sha(raw), raw)
    assert client.get("/v2/untagged/tags/list").get_json() == {"name": "untagged", "tags": []}


def test_catalog_pagination(app, client):
    assert client.get("/v2/_catalog").get_json() == {"repositories": []}
    config, layers, _ = image_blobs(app, [b"cat"])
    raw = manifest(config, layers)
    for name in ("b/app", "a", "c", "tags/list"):
        ok_put(client, name, "v1", raw)
    ok_put(client, "d", sha(raw), raw)  # a manifest without a tag still makes a repository
    assert client.get("/v2/_catalog").get_json() == {"repositories": ["a", "b/app", "c", "d", "tags/list"]}
    resp = client.get("/v2/_catalog?n=2")
    assert resp.get_json()["repositories"] == ["a", "b/app"]
    assert resp.headers["Link"] == '</v2/_catalog?n=2&last=b%2Fapp>; rel="next"'
    assert client.get("/v2/_catalog?n=2&last=b%2Fapp").get_json()["repositories"] == ["c", "d"]
    last = client.get("/v2/_catalog?n=2&last=d")
    assert last.get_json()["repositories"] == ["tags/list"] and "Link" not in last.headers
    assert client.get("/v2/_catalog?n=0").get_json() == {"repositories": []}
    v2_error(client.get("/v2/_catalog?n=many"), 400, "PAGINATION_NUMBER_INVALID")
    # route order: a repository whose name ends in tags/list is still a repository
    assert client.get("/v2/tags/list/tags/list").get_json() == {"name": "tags/list", "tags": ["v1"]}
    assert client.get("/v2/tags/list/manifests/v1").data == raw


# -- docket push <-> V2 ---------------------------------------------------------------------------------------
def _docket_push(client: FlaskClient, ref: str, payloads: list[bytes]) -> dict:
    layers = [layer_tar(p) for p in payloads]
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2025-01-02T03:04:05Z",
                         "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]}}).encode()
    for data, kind in [*((x, "layer") for x in layers), (config, "config")]:
        resp = client.post(f"/api/v1/blobs?kind={kind}&digest={sha(data)}", data=data,
                           headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code in (200, 201), resp.get_data(as_text=True)
    repo, _, tag = ref.rpartition(":")
    resp = client.put(f"/api/v1/repositories/{repo}/manifests/{tag}",
                      json={"config": sha(config), "layers": [sha(x) for x in layers]})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


def test_docket_push_is_pullable_over_v2(app, client):
    rec = _docket_push(client, "team/app:v1", [b"base", b"top"])
    resp = client.get("/v2/team/app/manifests/v1")
    assert resp.status_code == 200 and resp.headers["Content-Type"] == DOCKER_MANIFEST
    assert resp.headers["Docker-Content-Digest"] == rec["digest"] == rec["manifest_digest"] == sha(resp.data)
    body = json.loads(resp.data)
    assert body["schemaVersion"] == 2 and body["mediaType"] == DOCKER_MANIFEST
    assert body["config"] == {"mediaType": DOCKER_CONFIG, "size": rec["config"]["size"],
                              "digest": rec["config"]["digest"]}
    assert body["layers"] == [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar", "size": x["size"],
                               "digest": x["digest"]} for x in rec["layers"]]
    for d in (body["config"]["digest"], *(x["digest"] for x in body["layers"])):
        with client.get(f"/v2/team/app/blobs/{d}") as blob:
            assert blob.status_code == 200 and sha(blob.data) == d
    assert client.get(f"/v2/team/app/manifests/{rec['digest']}").data == resp.data
    assert manifest_row(app, "team/app", rec["digest"]).origin == "docket"
    assert client.get("/v2/team/app/tags/list").get_json()["tags"] == ["v1"]
    # the same image pushed again elsewhere: the same bytes, so the same digest
    again = _docket_push(client, "other:latest", [b"base", b"top"])
    assert again["digest"] == rec["digest"]
    # deleting the tag drops the manifest docket wrote: nothing else uses it
    assert client.delete("/api/v1/repositories/team/app/tags/v1").status_code == 204
    v2_error(client.get(f"/v2/team/app/manifests/{rec['digest']}"), 404, "MANIFEST_UNKNOWN")
    assert manifest_row(app, "team/app", rec["digest"]) is None
    assert blob_row(app, rec["digest"]).unreferenced_at is None  # its bytes: still other:latest's manifest
    assert client.delete("/v2/other/manifests/latest").status_code == 202
    assert blob_row(app, rec["digest"]).unreferenced_at is not None


def test_v2_push_over_a_docket_tag_and_back(app, client):
    rec = _docket_push(client, "mix:v1", [b"docket"])
    config, layers, _ = image_blobs(app, [b"v2"])
    raw = manifest(config, layers)
    ok_put(client, "mix", "v1", raw)  # the tag moves: the docket manifest and its only-used blobs go
    assert manifest_row(app, "mix", rec["digest"]) is None
    assert blob_row(app, rec["digest"]).unreferenced_at is not None
    assert blob_row(app, rec["layers"][0]["digest"]).unreferenced_at is not None
    rec2 = _docket_push(client, "mix:v1", [b"docket"])  # and back: the V2 manifest stays (untagged)
    assert rec2["digest"] == rec["digest"] and manifest_row(app, "mix", sha(raw)) is not None
    assert blob_row(app, rec["digest"]).unreferenced_at is None
    # docker pull + docker push of the docket image: the same bytes become a V2 manifest (kept until DELETE)
    pulled = client.get("/v2/mix/manifests/v1").data
    ok_put(client, "mix", "copy", pulled)
    assert manifest_row(app, "mix", rec["digest"]).origin == "v2"
    assert client.delete("/api/v1/repositories/mix/tags/v1").status_code == 204
    assert client.get(f"/v2/mix/manifests/{rec['digest']}").status_code == 200


def test_gc_drops_untagged_docket_manifests_and_backfill(app, client):
    rec = _docket_push(client, "gc:v1", [b"gc"])
    sv = app.extensions["docket"]
    # a tag pushed before 0003: no manifest row, the canonical docket digest
    with sv.db.session() as s:
        s.delete(s.scalars(select(Manifest)).one())
        image = s.scalars(select(Image)).one()
        image.manifest_digest = "sha256:" + "c" * 64
        s.commit()
    assert sv.manifests.backfill() == 1
    assert manifest_row(app, "gc", rec["digest"]).origin == "docket"
    assert record(client, "gc:v1") == rec
    assert sv.manifests.backfill() == 0
    # and lazily on GET (a registry not started: tests, tools)
    with sv.db.session() as s:
        s.delete(s.scalars(select(Manifest)).one())
        s.commit()
    assert client.get("/v2/gc/manifests/v1").headers["Docker-Content-Digest"] == rec["digest"]
    # a docket manifest left untagged (a crash between two transactions): GC drops it, then its bytes
    with sv.db.session() as s:
        s.delete(s.scalars(select(Image)).one())
        s.commit()
    assert manifest_row(app, "gc", rec["digest"]) is not None
    assert sv.gc.run_once() == []
    assert manifest_row(app, "gc", rec["digest"]) is None
    assert blob_row(app, rec["digest"]).unreferenced_at is not None
    assert rec["digest"] in sv.gc.run_once(now=utcnow() + timedelta(hours=1))


def test_werkzeug_errors_under_v2_use_the_spec_body(client):
    v2_error(client.post("/v2/app/manifests/v1"), 405, "UNSUPPORTED")


@pytest.mark.parametrize("where", ["layer", "config", "artifactType"])
def test_media_type_longer_than_255_is_invalid_on_every_database(app, client, where):
    """A media type is at most 127 + "/" + 127 characters (RFC 6838): a longer one is the client's error, 400,
    not a value PostgreSQL's varchar(255) refuses with a 500 after the checks."""
    config, layers, _ = image_blobs(app, [b"long media type"], compress=False, layer_type=OCI_LAYER)
    long_type = "application/vnd.example." + "x" * 250
    extra: dict[str, Any] = {}
    if where == "layer":
        layers = [{**layers[0], "mediaType": long_type}]
    elif where == "config":
        config = {**config, "mediaType": long_type}
    else:
        extra["artifactType"] = long_type
    raw = manifest(config, layers, media_type=OCI_MANIFEST, **extra)
    v2_error(put(client, "t/long", "v1", raw, OCI_MANIFEST), 400, "MANIFEST_INVALID")
    assert client.get("/v2/t/long/manifests/v1").status_code == 404
