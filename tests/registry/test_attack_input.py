"""Input that must be refused, not stored or crashed on (issue 11): trailing newlines that passed `$`, JSON the
parser cannot hold (deep nesting, integers past 64 bits), ambiguous or non-standard manifests (duplicate keys,
index-and-manifest documents, UTF-16, a BOM, NaN), the one layer limit of both APIs, and the spec's error shape for
every error under /v2.

Every case asserts the status, the body's shape, and that nothing changed: the catalog, the tags, /api/v1/images,
the files under blobs/ and the database's row counts. Most cases use the Flask app; a real ``docket-registry``
process takes the trailing newline and the deep JSON over a socket.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib
import io
import json
import pkgutil
import re
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

import docket
from docket import jsonstrict
from docket.errors import InvalidJSON
from docket.limits import MAX_JSON_DEPTH, MAX_LAYERS
from docket.registry.models import Blob, Image, ImageLayer, Manifest, ManifestRef
from tests.support.robustness_rows import record

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
GZIP_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DEEP = 100_000


# -- fixtures and helpers ---------------------------------------------------------------------------------------
pytestmark = pytest.mark.registry_config(max_upload_size=8 << 20)


def sha(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def layer_tar(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        info = tarfile.TarInfo("hello.txt")
        info.size = len(payload)
        t.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def store(app: Flask, data: bytes) -> dict[str, Any]:
    sv = app.extensions["docket"]
    with sv.store.upload() as up:
        up.write(data)
        up.finish()
        sv.blobs.store_upload(up, "blob")
    return {"digest": sha(data), "size": len(data)}


@pytest.fixture
def image(app: Flask, client: FlaskClient) -> dict[str, Any]:
    """One good image pushed over /v2 as app:good, so there are tags and blobs that must stay as they are."""
    tar = layer_tar(b"attack input")
    layer = gzip.compress(tar, mtime=0)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha(tar)]}}).encode()
    store(app, layer)
    store(app, config)
    cdesc = {"mediaType": DOCKER_CONFIG, "digest": sha(config), "size": len(config)}
    ldesc = {"mediaType": GZIP_LAYER, "digest": sha(layer), "size": len(layer)}
    raw = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": cdesc, "layers": [ldesc]}).encode()
    resp = client.put("/v2/app/manifests/good", data=raw, headers={"Content-Type": DOCKER_MANIFEST})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return {"config": cdesc, "layer": ldesc, "raw": raw}


def snapshot(app: Flask, client: FlaskClient, location: Path) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    sv = app.extensions["docket"]
    with sv.db.session() as s:
        rows = {m.__name__: s.scalar(select(func.count()).select_from(m))
                for m in (Blob, Image, ImageLayer, Manifest, ManifestRef)}
    files = sorted(str(p.relative_to(location)) for p in (location / "blobs").rglob("*") if p.is_file())
    return {"rows": rows, "files": files, "catalog": client.get("/v2/_catalog").get_json(),
            "tags": client.get("/v2/app/tags/list").get_json(), "images": client.get("/api/v1/images").get_json()}


def v2_error(resp, status: int, code: str | None = None) -> dict[str, Any]:
    """The spec's shape, exactly: {"errors": [{"code", "message", "detail"}]}."""
    raw = resp.content if isinstance(resp, requests.Response) else resp.get_data()
    assert resp.status_code == status, raw[:500]
    body = json.loads(raw)
    assert set(body) == {"errors"} and len(body["errors"]) == 1, body
    err = body["errors"][0]
    assert set(err) == {"code", "message", "detail"}, err
    assert re.fullmatch(r"[A-Z_]+", err["code"]) and err["message"], err
    if code is not None:
        assert err["code"] == code, err
    return err


def v1_error(resp, status: int, code: str | None = None) -> dict[str, Any]:
    raw = resp.content if isinstance(resp, requests.Response) else resp.get_data()
    assert resp.status_code == status, raw[:500]
    body = json.loads(raw)
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "hint"}, body
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def manifest_bytes(image: dict[str, Any], **extra: Any) -> bytes:
    body = {"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": image["config"], "layers": [image["layer"]]}
    body.update(extra)
    return json.dumps(body).encode()


# -- trailing newlines and whole-string matching -----------------------------------------------------------------
def test_every_validation_pattern_matches_whole_strings():
    """The class: no compiled pattern in the package (registry, client, torrent) ends with `$` (which also matches
    before a trailing newline); each is anchored with \\Z, and the shared ones refuse "<valid>\\n"."""
    offenders = []
    for mod in pkgutil.walk_packages(docket.__path__, "docket."):
        if mod.name.endswith(".__main__"):  # importing it runs the CLI
            continue
        module = importlib.import_module(mod.name)
        for attr, value in vars(module).items():
            if isinstance(value, re.Pattern):
                pattern = value.pattern if isinstance(value.pattern, str) else value.pattern.decode("latin-1")
                outside_classes = re.sub(r"\[(?:\\.|[^\]\\])*\]", "", pattern)  # `[$-]` is a literal $
                if re.search(r"(?<!\\)\$", outside_classes):
                    offenders.append(f"{mod.name}.{attr}: {pattern}")
    assert offenders == []
    from docket.reference import ANY_DIGEST_RE, REPOSITORY_RE, TAG_RE, parse_reference
    from docket.registry.store import validate_digest
    from docket.registry.v2 import NAME_RE

    digest = sha(b"x")
    for pattern, good in ((TAG_RE, "v1"), (ANY_DIGEST_RE, digest), (REPOSITORY_RE, "team/app"), (NAME_RE, "app")):
        assert pattern.fullmatch(good) and pattern.match(good)
        assert not pattern.match(good + "\n") and not pattern.search(good + "\n")
    with pytest.raises(docket.errors.InvalidRequest):
        validate_digest(digest + "\n")
    with pytest.raises(docket.errors.InvalidReference):
        parse_reference("app:v1\n")
    record("input", "every validation regex in the package with a trailing newline",
           "no pattern uses `$`; tags, digests, names with '\\n' are refused")


NL_CASES = ["v2-tag", "v2-digest-ref", "v2-blob", "v2-monolithic", "v2-mount", "v2-upload-finish", "v2-name",
            "v1-manifest-tag", "v1-push-tag", "v1-blob-digest", "v1-get-blob", "v1-repository"]


@pytest.mark.parametrize("case", NL_CASES)
def test_trailing_newline_is_refused_and_nothing_is_stored(app, client, location, image, case):
    before = snapshot(app, client, location)
    digest = sha(image["raw"])
    layer = image["layer"]["digest"]
    if case == "v2-tag":
        resp = client.put("/v2/app/manifests/v1%0A", data=image["raw"], headers={"Content-Type": DOCKER_MANIFEST})
        v2_error(resp, 400, "MANIFEST_INVALID")
    elif case == "v2-digest-ref":
        resp = client.put(f"/v2/app/manifests/{digest}%0A", data=image["raw"],
                          headers={"Content-Type": DOCKER_MANIFEST})
        v2_error(resp, 400, "DIGEST_INVALID")
    elif case == "v2-blob":
        v2_error(client.get(f"/v2/app/blobs/{layer}%0A"), 400, "DIGEST_INVALID")
    elif case == "v2-monolithic":
        resp = client.post(f"/v2/app/blobs/uploads/?digest={sha(b'new')}%0A", data=b"new")
        v2_error(resp, 400, "DIGEST_INVALID")
    elif case == "v2-mount":
        v2_error(client.post(f"/v2/app/blobs/uploads/?mount={layer}%0A&from=app"), 400, "DIGEST_INVALID")
    elif case == "v2-upload-finish":
        start = client.post("/v2/app/blobs/uploads/")
        assert start.status_code == 202
        resp = client.put(f"{start.headers['Location']}?digest={sha(b'new')}%0A", data=b"new")
        v2_error(resp, 400, "DIGEST_INVALID")
        client.delete(start.headers["Location"])
    elif case == "v2-name":
        v2_error(client.get("/v2/app%0A/tags/list"), 400, "NAME_INVALID")
        v2_error(client.put("/v2/a%09b/manifests/v1", data=image["raw"], headers={"Content-Type": DOCKER_MANIFEST}),
                 400, "NAME_INVALID")
        v2_error(client.get(f"/v2/app/referrers/{layer}%00"), 400, "DIGEST_INVALID")
    elif case == "v1-manifest-tag":
        body = json.dumps({"config": image["config"]["digest"], "layers": [layer]}).encode()
        resp = client.put("/api/v1/repositories/app/manifests/v1%0A", data=body,
                          headers={"Content-Type": "application/json"})
        v1_error(resp, 400, "INVALID_REFERENCE")
    elif case == "v1-push-tag":
        resp = client.put("/api/v1/repositories/app/tags/v1%0A", data=b"not a tarball",
                          headers={"Content-Type": "application/x-tar"})
        v1_error(resp, 400, "INVALID_REFERENCE")
    elif case == "v1-blob-digest":
        resp = client.post(f"/api/v1/blobs?kind=config&digest={sha(b'{}')}%0A", data=b"{}",
                           headers={"Content-Type": "application/octet-stream"})
        v1_error(resp, 400, "INVALID_REQUEST")
    elif case == "v1-get-blob":
        v1_error(client.get(f"/api/v1/blobs/{layer}%0A"), 400, "INVALID_REQUEST")
    elif case == "v1-repository":
        v1_error(client.get("/api/v1/repositories/app%0A/tags/good"), 400, "INVALID_REFERENCE")
        v1_error(client.put("/api/v1/repositories/a%7Fb/tags/x", data=b"x"), 400, "INVALID_REFERENCE")
    assert snapshot(app, client, location) == before
    record("input", f"trailing newline: {case}", "4xx in the face's error shape; nothing stored")


# -- the strict JSON parser ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, problem", [
    (b"[" * DEEP + b"]" * DEEP, "deeper"),
    (b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1), "deeper"),
    (b'{"size": 18446744073709551616}', "64 bits"),
    (b'{"size": -9223372036854775809}', "64 bits"),
    (b'{"size": ' + b"9" * 5000 + b"}", "64 bits"),
    (b'{"size": 1e400}', "64-bit float"),
    (b'{"size": NaN}', "NaN"),
    (b'{"size": -Infinity}', "Infinity"),
    (b'{"a": 1, "a": 2}', "twice"),
    (b'\xef\xbb\xbf{"a": 1}', "byte order mark"),
    ('{"a": 1}'.encode("utf-16"), "UTF-8"),
    ('{"a": 1}'.encode("utf-16-le"), "NUL"),
    (b'{"a": "\xff"}', "UTF-8"),
    (b'{"a": "\\ud800"}', "surrogate"),
    (b'{"\\udfff": 1}', "surrogate"),
    (b'{"a": [1, 2,]}', "not valid JSON"),
])
def test_strict_parser_refuses(raw, problem):
    with pytest.raises(InvalidJSON) as info:
        jsonstrict.loads(raw, what="doc")
    assert problem in info.value.message and info.value.message.startswith("doc ")
    assert info.value.status == 400


def test_strict_parser_accepts_what_manifests_hold():
    doc = {"schemaVersion": 2, "size": 2**63 - 1, "neg": -(2**63), "f": 1.5, "s": "caf\u00e9 \U0001f600 [{\"",
           "deep": [[[[[[[[[[{"k": None}]]]]]]]]]], "b": [True, False]}
    assert jsonstrict.loads(json.dumps(doc).encode()) == doc
    assert jsonstrict.loads(json.dumps(doc, ensure_ascii=False).encode("utf-8")) == doc
    assert jsonstrict.loads(b'{"pair": "\\ud83d\\ude00"}') == {"pair": "\U0001f600"}
    nested = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert jsonstrict.loads(nested) is not None
    assert jsonstrict.loads('"' + "[[{{" * 100 + '"') == "[[{{" * 100  # brackets in strings do not nest
    with pytest.raises(InvalidJSON, match="limit is 10"):
        jsonstrict.loads(b"[" + b"1," * 10 + b"1]", max_bytes=10)
    started = time.monotonic()
    with pytest.raises(InvalidJSON):
        jsonstrict.loads(b"[" * (4 << 20))
    with pytest.raises(InvalidJSON):
        jsonstrict.loads(b'"' + b'\\"' * (2 << 20))  # escaped quotes never end the string: linear, not quadratic
    assert time.monotonic() - started < 5


JSON_CASES = {
    "deep-nesting": lambda img: b'{"schemaVersion": 2, "x": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "size-past-int64": lambda img: manifest_bytes(img).replace(
        f'"size": {img["layer"]["size"]}'.encode(), b'"size": 18446744073709551616'),
    "5000-digit-integer": lambda img: manifest_bytes(img).replace(
        f'"size": {img["layer"]["size"]}'.encode(), b'"size": ' + b"9" * 5000),
    "float-overflow": lambda img: manifest_bytes(img).replace(
        f'"size": {img["layer"]["size"]}'.encode(), b'"size": 1e999'),
    "NaN": lambda img: manifest_bytes(img).replace(f'"size": {img["layer"]["size"]}'.encode(), b'"size": NaN'),
    "duplicate-layers-key": lambda img: manifest_bytes(img)[:-1] + b', "layers": []}',
    "duplicate-mediaType": lambda img: manifest_bytes(img)[:-1] + f', "mediaType": "{OCI_INDEX}"}}'.encode(),
    "utf-16": lambda img: manifest_bytes(img).decode().encode("utf-16"),
    "utf-16-no-bom": lambda img: manifest_bytes(img).decode().encode("utf-16-le"),
    "bom": lambda img: b"\xef\xbb\xbf" + manifest_bytes(img),
    "lone-surrogate": lambda img: manifest_bytes(img)[:-1] + b', "artifactType": "a\\ud800"}',
    "index-and-manifest": lambda img: json.dumps({"schemaVersion": 2, "config": img["config"],
                                                  "layers": [img["layer"]], "manifests": []}).encode(),
    "index-type-with-layers": lambda img: json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
                                                      "layers": [img["layer"]]}).encode(),
    "manifest-type-with-manifests": lambda img: manifest_bytes(img, manifests=[]),
}


@pytest.mark.parametrize("case", list(JSON_CASES))
@pytest.mark.parametrize("content_type", ["application/json", "typed"])
def test_v2_manifest_json_it_cannot_hold_is_a_400(app, client, location, image, case, content_type):
    raw = JSON_CASES[case](image)
    if content_type == "typed":
        content_type = OCI_INDEX if case == "index-type-with-layers" else DOCKER_MANIFEST
        if case == "index-and-manifest":
            content_type = OCI_MANIFEST
    before = snapshot(app, client, location)
    resp = client.put("/v2/app/manifests/evil", data=raw, headers={"Content-Type": content_type})
    err = v2_error(resp, 400, "MANIFEST_INVALID")
    assert snapshot(app, client, location) == before
    v2_error(client.get("/v2/app/manifests/evil"), 404, "MANIFEST_UNKNOWN")
    v2_error(client.get(f"/v2/app/manifests/{sha(raw)}"), 404, "MANIFEST_UNKNOWN")
    assert client.get("/healthz").status_code in (200, 503)  # still serving
    record("input", f"/v2 manifest: {case} ({'generic' if content_type == 'application/json' else 'typed'})",
           f"400 MANIFEST_INVALID: {err['message'][:80]}; nothing stored")


V1_CASES = {
    "deep-nesting": lambda img: b'{"config": "x", "layers": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "5000-digit-integer": lambda img: b'{"config": "x", "layers": [' + b"9" * 5000 + b"]}",
    "duplicate-layers-key": lambda img: json.dumps({"config": img["config"]["digest"], "layers": []}).encode()[:-1]
    + f', "layers": ["{img["layer"]["digest"]}"]}}'.encode(),
    "NaN": lambda img: b'{"config": NaN, "layers": []}',
    "bom": lambda img: b"\xef\xbb\xbf" + json.dumps({"config": img["config"]["digest"], "layers": []}).encode(),
    "utf-16": lambda img: json.dumps({"config": img["config"]["digest"], "layers": []}).encode("utf-16"),
    "too-many-layers": lambda img: json.dumps({"config": img["config"]["digest"],
                                               "layers": [img["layer"]["digest"]] * (MAX_LAYERS + 1)}).encode(),
}


@pytest.mark.parametrize("case", list(V1_CASES))
def test_api_v1_manifest_json_it_cannot_hold_is_a_400(app, client, location, image, case):
    before = snapshot(app, client, location)
    resp = client.put("/api/v1/repositories/app/manifests/evil", data=V1_CASES[case](image),
                      headers={"Content-Type": "application/json"})
    err = v1_error(resp, 400, "INVALID_REQUEST")
    assert snapshot(app, client, location) == before
    record("input", f"/api/v1 manifest: {case}", f"400 INVALID_REQUEST: {err['message'][:80]}; nothing stored")


def _tarball(manifest_json: bytes, config: bytes | None = None) -> bytes:
    """A `docker save`-shaped tarball whose manifest.json (and config) are exactly these bytes."""
    tar_bytes = layer_tar(b"tarball attack")
    config = config if config is not None else json.dumps(
        {"os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(tar_bytes)]}}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for name, data in ((f"{sha(config)[7:]}.json", config), ("l1/layer.tar", tar_bytes),
                           ("manifest.json", manifest_json)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _entry(config: bytes | None = None, layers: list[str] | None = None) -> dict[str, Any]:
    tar_bytes = layer_tar(b"tarball attack")
    config = config if config is not None else json.dumps(
        {"os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha(tar_bytes)]}}).encode()
    return {"Config": f"{sha(config)[7:]}.json", "RepoTags": ["app:t"], "Layers": layers or ["l1/layer.tar"]}


DUP_CONFIG = b'{"os": "linux", "rootfs": {"type": "layers", "diff_ids": []}, "rootfs": {"type": "layers"}}'
TARBALL_CASES = {
    "manifest.json deep": lambda: _tarball(b"[" * DEEP + b"]" * DEEP),
    "manifest.json duplicate Layers": lambda: _tarball(json.dumps([_entry()]).encode()[:-2] + b', "Layers": []}]'),
    "manifest.json huge integer": lambda: _tarball(b'[{"Config": 1' + b"0" * 5000 + b"}]"),
    "manifest.json utf-16": lambda: _tarball(json.dumps([_entry()]).encode("utf-16")),
    "manifest.json 1001 layers": lambda: _tarball(json.dumps([_entry(layers=["l1/layer.tar"] * (MAX_LAYERS + 1))])
                                                  .encode()),
    "config duplicate rootfs": lambda: _tarball(json.dumps([_entry(DUP_CONFIG)]).encode(), DUP_CONFIG),
    "config NaN": lambda: _tarball(json.dumps([_entry(b'{"os": NaN}')]).encode(), b'{"os": NaN}'),
}


@pytest.mark.parametrize("case", list(TARBALL_CASES))
def test_whole_tarball_json_it_cannot_hold_is_a_400(app, client, location, image, case):
    before = snapshot(app, client, location)
    resp = client.put("/api/v1/repositories/app/tags/t", data=TARBALL_CASES[case](),
                      headers={"Content-Type": "application/x-tar"})
    err = v1_error(resp, 400, "INVALID_IMAGE")
    assert snapshot(app, client, location) == before
    assert not [p for p in (location / "uploads").rglob("*") if p.is_file()]  # the temp tarball is gone
    record("input", f"whole-tarball push: {case}", f"400 INVALID_IMAGE: {err['message'][:80]}; nothing stored")


def test_huge_page_size_is_served_not_a_500(client, image):
    resp = client.get("/v2/_catalog?n=" + "9" * 5000)
    assert resp.status_code == 200 and resp.get_json() == {"repositories": ["app"]}
    resp = client.get("/v2/app/tags/list?n=" + "9" * 30)
    assert resp.status_code == 200 and resp.get_json()["tags"] == ["good"]
    record("input", "?n= with 5,000 digits (catalog, tags list)", "200, served as the largest page")


def test_index_child_size_must_match(app, client, location, image):
    """Sizes in an index are summed into the tag's size: a child's size must be the true one (no int64 overflow)."""
    child = {"mediaType": DOCKER_MANIFEST, "digest": sha(image["raw"]), "size": 2**63 - 1}
    raw = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child, child]}).encode()
    before = snapshot(app, client, location)
    err = v2_error(client.put("/v2/app/manifests/idx", data=raw, headers={"Content-Type": OCI_INDEX}), 400,
                   "MANIFEST_INVALID")
    assert str(len(image["raw"])) in err["message"]
    assert snapshot(app, client, location) == before
    record("input", "index listing a child with size 2^63-1 (twice)", "400 MANIFEST_INVALID; nothing stored")


# -- one layer limit ----------------------------------------------------------------------------------------------
def test_one_layer_limit_for_both_apis(app, client, location, image):
    import docket.imagetar
    import docket.registry.api
    import docket.registry.oci

    assert docket.registry.api.MAX_LAYERS is MAX_LAYERS is docket.registry.oci.MAX_LAYERS \
        is docket.imagetar.MAX_LAYERS
    from docket.registry.oci import parse_manifest

    at_limit = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": image["config"],
                           "layers": [image["layer"]] * MAX_LAYERS}).encode()
    assert len(parse_manifest(at_limit, DOCKER_MANIFEST).layers) == MAX_LAYERS
    before = snapshot(app, client, location)
    for n in (MAX_LAYERS + 1, 20_000):
        raw = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST, "config": image["config"],
                          "layers": [image["layer"]] * n}).encode()
        started = time.monotonic()
        err = v2_error(client.put("/v2/app/manifests/many", data=raw, headers={"Content-Type": DOCKER_MANIFEST}),
                       400, "MANIFEST_INVALID")
        elapsed = time.monotonic() - started
        assert f"the limit is {MAX_LAYERS}" in err["message"] and err["detail"]["count"] == n
        assert elapsed < 5, elapsed  # 7 s before the limit; ~0.2 s here on an idle machine
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": DOCKER_MANIFEST, "digest": sha(image["raw"]), "size": len(image["raw"])}] * (MAX_LAYERS + 1)})
    v2_error(client.put("/v2/app/manifests/many", data=index, headers={"Content-Type": OCI_INDEX}), 400,
             "MANIFEST_INVALID")
    assert snapshot(app, client, location) == before
    record("input", "/v2 manifest with 1,001 and 20,000 layers; index with 1,001 manifests",
           f"400 MANIFEST_INVALID in {elapsed:.2f}s (limit {MAX_LAYERS}, the same constant as /api/v1)")


# -- the spec's error shape for every error under /v2 -------------------------------------------------------------
def test_every_error_under_v2_has_the_spec_shape(app, client, location, image):
    before = snapshot(app, client, location)
    v2_error(client.get("/v2/app/nothing/here/at/all"), 404)
    v2_error(client.get("/v2/app/manifests/good/extra"), 404)
    v2_error(client.post("/v2/app/manifests/good"), 405, "UNSUPPORTED")
    v2_error(client.patch("/v2/_catalog"), 405, "UNSUPPORTED")
    big = manifest_bytes(image, annotations={"pad": "x" * (4 << 20)})
    v2_error(client.put("/v2/app/manifests/big", data=big, headers={"Content-Type": DOCKER_MANIFEST}), 413)
    v2_error(client.get("/v2/_catalog", headers={"X-Pad": "x" * 70_000}), 431)
    v2_error(client.get("/v2/_catalog?n=%zz"), 400)
    # werkzeug's own HTTPExceptions raised inside a view
    from werkzeug.exceptions import Conflict, RequestEntityTooLarge

    import docket.registry.api
    import docket.registry.v2.manifests as v2_views

    original = v2_views.repository_tags
    for exc in (RequestEntityTooLarge(), Conflict()):
        def raise_it(*_a: Any, _exc: Exception = exc) -> Any:
            raise _exc
        v2_views.repository_tags = raise_it
        try:
            v2_error(client.get("/v2/app/tags/list"), exc.code)
        finally:
            v2_views.repository_tags = original
    # an unexpected exception (a bug): 500, the spec's shape, distribution's UNKNOWN, no traceback in the body
    def boom(*_a: Any) -> Any:
        raise RuntimeError("secret internal state")
    v2_views.repository_tags = boom
    try:
        err = v2_error(client.get("/v2/app/tags/list"), 500, "UNKNOWN")
        assert "secret" not in err["message"]
    finally:
        v2_views.repository_tags = original
    original_images = docket.registry.api.all_images
    docket.registry.api.all_images = boom  # /api/v1 keeps its own body
    try:
        v1_error(client.get("/api/v1/images"), 500, "INTERNAL")
    finally:
        docket.registry.api.all_images = original_images
    assert snapshot(app, client, location) == before
    record("input", "errors under /v2: unknown route, 405, 413, 431, bad query, werkzeug 409/413, a bug (500)",
           "every one {errors:[{code,message,detail}]} with a spec code (500: UNKNOWN)")


# -- a real registry process --------------------------------------------------------------------------------------
def test_real_registry_refuses_trailing_newline_and_deep_json(registry_server):
    url = registry_server.url
    session = requests.Session()
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}).encode()
    ok = session.put(f"{url}/v2/real/manifests/v1", data=index, headers={"Content-Type": OCI_INDEX}, timeout=30)
    assert ok.status_code == 201, ok.text
    tags_before = session.get(f"{url}/v2/real/tags/list", timeout=30).json()
    images_before = session.get(f"{url}/api/v1/images", timeout=30).json()
    blobs = registry_server.location / "blobs"
    files_before = sorted(p.name for p in blobs.rglob("*") if p.is_file())

    resp = session.put(f"{url}/v2/real/manifests/v2%0A", data=index, headers={"Content-Type": OCI_INDEX},
                       timeout=30)
    v2_error(resp, 400, "MANIFEST_INVALID")
    resp = session.put(f"{url}/api/v1/repositories/real/manifests/v2%0A", data=b'{"config": "x", "layers": []}',
                       headers={"Content-Type": "application/json"}, timeout=30)
    v1_error(resp, 400, "INVALID_REFERENCE")
    deep = b'{"schemaVersion": 2, "manifests": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    resp = session.put(f"{url}/v2/real/manifests/deep", data=deep, headers={"Content-Type": OCI_INDEX}, timeout=30)
    v2_error(resp, 400, "MANIFEST_INVALID")
    resp = session.put(f"{url}/api/v1/repositories/real/manifests/deep",
                       data=b'{"config": "x", "layers": ' + b"[" * DEEP + b"]" * DEEP + b"}",
                       headers={"Content-Type": "application/json"}, timeout=30)
    v1_error(resp, 400, "INVALID_REQUEST")
    resp = session.put(f"{url}/v2/real/manifests/big", timeout=30, headers={"Content-Type": OCI_INDEX},
                       data=index[:-1] + b', "annotations": {"n": 1' + b"0" * 30 + b"}}")
    v2_error(resp, 400, "MANIFEST_INVALID")

    assert session.get(f"{url}/v2/real/tags/list", timeout=30).json() == tags_before == {"name": "real",
                                                                                          "tags": ["v1"]}
    assert session.get(f"{url}/api/v1/images", timeout=30).json() == images_before
    assert sorted(p.name for p in blobs.rglob("*") if p.is_file()) == files_before
    assert session.get(f"{url}/healthz", timeout=30).status_code == 200
    log = registry_server.log.read_text()
    assert "Traceback" not in log and "RecursionError" not in log
    record("input", "real docket-registry: tag 'v2\\n', 100,000 nested brackets, a 31-digit integer",
           "400 in each face's shape; tags, images, blobs unchanged; no traceback in the log")
