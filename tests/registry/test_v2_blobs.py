"""V2 blob routes and upload sessions (docs/v2.md "Blobs and uploads") through Flask's test client, seeding
disabled; one chunked upload over a real registry process at the end.

Every failed upload must leave nothing behind: no blob, no row, nothing in uploads/ (except a session the client
may still resume, which the tests then cancel or check explicitly).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from flask import Flask
from flask.testing import FlaskClient

from sqlalchemy import update

from docket.registry.models import KIND_BLOB, Blob, utcnow
from docket.registry.models import UploadSession as SessionRow
from tests.support.registry_images import layer_tar

LIMIT = 256 * 1024
UUID4_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
EMPTY_SHA256 = "sha256:" + hashlib.sha256(b"").hexdigest()


def sha(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


pytestmark = [pytest.mark.registry_config(max_upload_size=LIMIT), pytest.mark.databases("sqlite", "postgresql")]


def sv(app: Flask):
    return app.extensions["docket"]


def uploads_dir(location: Path) -> list[str]:
    return sorted(p.name for p in (location / "uploads").iterdir())


def blob_rows(app: Flask) -> list[str]:
    with sv(app).db.session() as s:
        return sorted(b.digest for b in s.query(Blob))


def check_error(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert body["errors"][0]["code"] == code, body
    assert body["errors"][0]["message"]
    return body["errors"][0]


def open_session(client: FlaskClient, name: str = "app") -> tuple[str, str]:
    resp = client.post(f"/v2/{name}/blobs/uploads/")
    assert resp.status_code == 202, resp.get_data(as_text=True)
    return resp.headers["Location"], resp.headers["Docker-Upload-UUID"]


def patch(client: FlaskClient, location: str, data: bytes, start: int | None = None, **kw):
    headers = {"Content-Type": "application/octet-stream", **kw.pop("headers", {})}
    if start is not None:
        headers["Content-Range"] = f"{start}-{start + len(data) - 1}"
    return client.patch(location, data=data, headers=headers, **kw)


def streamed(client: FlaskClient, method: str, url: str, data: bytes, headers: dict | None = None):
    """A body in chunked transfer encoding, no Content-Length (what docker's PATCH sends)."""
    return client.open(url, method=method, input_stream=io.BytesIO(data),
                       headers={"Content-Type": "application/octet-stream", "Transfer-Encoding": "chunked",
                                **(headers or {})},
                       environ_overrides={"CONTENT_LENGTH": "", "wsgi.input_terminated": True})


def monolithic(client: FlaskClient, name: str, data: bytes, digest: str | None = None):
    return client.post(f"/v2/{name}/blobs/uploads/?digest={digest or sha(data)}", data=data,
                       headers={"Content-Type": "application/octet-stream"})


# -- monolithic uploads and GET/HEAD ------------------------------------------------------------------------------
def test_monolithic_upload_then_get_and_head(client, app, location):
    data = os.urandom(5000)
    digest = sha(data)
    resp = monolithic(client, "library/app", data)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["Location"] == f"/v2/library/app/blobs/{digest}"
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert uploads_dir(location) == []
    with sv(app).db.session() as s:
        blob = s.get(Blob, digest)
        assert (blob.kind, blob.size, blob.info_hash) == (KIND_BLOB, 5000, None)  # no torrent for a plain blob

    resp = client.get(f"/v2/library/app/blobs/{digest}")
    assert resp.status_code == 200
    assert resp.data == data
    assert resp.headers["Content-Length"] == "5000"
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["ETag"] == f'"{digest}"'
    resp.close()
    assert sv(app).downloads.count(digest) == 0

    resp = client.head(f"/v2/other/repo/blobs/{digest}")  # blobs are global
    assert resp.status_code == 200
    assert resp.data == b""
    assert resp.headers["Content-Length"] == "5000"
    assert resp.headers["Docker-Content-Digest"] == digest

    resp = client.get(f"/v2/library/app/blobs/{digest}", headers={"If-None-Match": f'"{digest}"'})
    assert resp.status_code == 304

    # the same bytes again: still 201, one blob
    assert monolithic(client, "library/app", data).status_code == 201
    assert blob_rows(app) == [digest]


def test_monolithic_wrong_digest_stores_nothing(client, app, location):
    data = b"some bytes"
    err = check_error(monolithic(client, "app", data, digest=sha(b"other bytes")), 400, "DIGEST_INVALID")
    assert sha(data) in err["message"]
    assert blob_rows(app) == []
    assert uploads_dir(location) == []


def test_monolithic_sha512(client, app, location):
    data = os.urandom(3000)
    digest = sha(data, "sha512")
    resp = monolithic(client, "app", data, digest)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert (location / "blobs" / "sha512" / digest.split(":")[1]).read_bytes() == data
    resp = client.get(f"/v2/app/blobs/{digest}")
    assert (resp.status_code, resp.data, resp.headers["Docker-Content-Digest"]) == (200, data, digest)


def test_empty_blob(client, app, location):
    loc, _ = open_session(client)
    resp = client.put(f"{loc}?digest={EMPTY_SHA256}")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    resp = client.get(f"/v2/app/blobs/{EMPTY_SHA256}")
    assert (resp.status_code, resp.data, resp.headers["Content-Length"]) == (200, b"", "0")
    assert uploads_dir(location) == []


# -- sessions -----------------------------------------------------------------------------------------------------
def test_post_opens_a_session(client, app, location):
    resp = client.post("/v2/org/app/blobs/uploads/")
    assert resp.status_code == 202
    session_id = resp.headers["Docker-Upload-UUID"]
    assert UUID4_RE.match(session_id)
    assert resp.headers["Location"] == f"/v2/org/app/blobs/uploads/{session_id}"
    assert resp.headers["Range"] == "0-0"
    assert resp.data == b""
    assert uploads_dir(location) == [f"session-{session_id}"]
    # without the trailing slash too
    assert client.post("/v2/org/app/blobs/uploads").status_code == 202
    assert len(sv(app).uploads) == 2


def test_chunked_upload_in_order(client, app, location):
    data = os.urandom(70_000)
    loc, session_id = open_session(client)
    resp = patch(client, loc, data[:100], start=0)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.headers["Range"] == "0-99"
    assert resp.headers["Location"] == loc
    assert resp.headers["Docker-Upload-UUID"] == session_id
    resp = patch(client, loc, data[100:50_000], start=100)
    assert (resp.status_code, resp.headers["Range"]) == (202, "0-49999")

    resp = client.get(loc)  # status
    assert resp.status_code == 204
    assert (resp.headers["Range"], resp.headers["Docker-Upload-UUID"], resp.headers["Location"]) == \
        ("0-49999", session_id, loc)

    # the last chunk with the PUT
    resp = client.put(f"{loc}?digest={sha(data)}", data=data[50_000:],
                      headers={"Content-Range": f"50000-{len(data) - 1}", "Content-Type": "application/octet-stream"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["Location"] == f"/v2/app/blobs/{sha(data)}"
    assert resp.headers["Docker-Content-Digest"] == sha(data)
    assert client.get(f"/v2/app/blobs/{sha(data)}").data == data
    assert uploads_dir(location) == []
    check_error(client.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")  # the session is over


def test_docker_style_streamed_patch_then_empty_put(client, app, location):
    """docker: POST, one PATCH with the whole layer (chunked, no Content-Range), PUT ?digest= without a body."""
    data = os.urandom(200_000)
    loc, _ = open_session(client)
    resp = streamed(client, "PATCH", loc, data)
    assert resp.status_code == 202, resp.get_data(as_text=True)
    assert resp.headers["Range"] == f"0-{len(data) - 1}"
    resp = client.put(f"{loc}?digest={sha(data)}", headers={"Content-Length": "0"})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert client.get(f"/v2/app/blobs/{sha(data)}").data == data
    assert uploads_dir(location) == []


def test_sha512_chunked_upload(client, app, location):
    data = os.urandom(10_000)
    digest = sha(data, "sha512")
    loc, _ = open_session(client)
    assert patch(client, loc, data[:4000], start=0).status_code == 202
    assert patch(client, loc, data[4000:]).status_code == 202  # no Content-Range: appended
    resp = client.put(f"{loc}?digest={digest}")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["Docker-Content-Digest"] == digest
    resp = client.get(f"/v2/app/blobs/{digest}")
    assert (resp.status_code, resp.data) == (200, data)
    assert uploads_dir(location) == []


@pytest.mark.parametrize("start", [0, 50, 150, 200])
def test_out_of_order_chunk_is_416_with_the_current_range(client, app, location, start):
    data = os.urandom(300)
    loc, _ = open_session(client)
    assert patch(client, loc, data[:100], start=0).status_code == 202
    resp = patch(client, loc, data[start:start + 100], start=start)
    check_error(resp, 416, "BLOB_UPLOAD_INVALID")
    assert resp.headers["Range"] == "0-99"
    assert resp.headers["Location"] == loc
    # nothing was appended; the upload goes on from byte 100
    assert patch(client, loc, data[100:], start=100).status_code == 202
    assert client.put(f"{loc}?digest={sha(data)}").status_code == 201
    assert client.get(f"/v2/app/blobs/{sha(data)}").data == data


@pytest.mark.parametrize("value", ["abc", "10-5", "-5", "bytes=a-b", "0-"])
def test_malformed_content_range_is_416(client, location, value):
    loc, _ = open_session(client)
    resp = client.patch(loc, data=b"x" * 10, headers={"Content-Range": value})
    check_error(resp, 416, "BLOB_UPLOAD_INVALID")
    assert resp.headers["Range"] == "0-0"


def test_content_length_must_match_content_range(client, location):
    loc, _ = open_session(client)
    resp = client.patch(loc, data=b"x" * 10, headers={"Content-Range": "0-19"})
    check_error(resp, 400, "SIZE_INVALID")
    assert client.get(loc).headers["Range"] == "0-0"


def test_truncated_chunk_leaves_the_session_as_it_was(client, app, location):
    data = os.urandom(1000)
    loc, session_id = open_session(client)
    assert patch(client, loc, data[:400], start=0).status_code == 202
    resp = client.patch(loc, input_stream=io.BytesIO(data[400:500]), headers={"Content-Range": "400-999"},
                        environ_overrides={"CONTENT_LENGTH": "600"})
    check_error(resp, 400, "BLOB_UPLOAD_INVALID")
    assert client.get(loc).headers["Range"] == "0-399"
    assert (location / "uploads" / f"session-{session_id}").stat().st_size == 400  # cut back
    assert patch(client, loc, data[400:], start=400).status_code == 202
    assert client.put(f"{loc}?digest={sha(data)}").status_code == 201
    assert client.get(f"/v2/app/blobs/{sha(data)}").data == data


def test_wrong_digest_on_put_ends_the_session(client, app, location):
    loc, _ = open_session(client)
    assert patch(client, loc, b"hello", start=0).status_code == 202
    err = check_error(client.put(f"{loc}?digest={sha(b'bye')}"), 400, "DIGEST_INVALID")
    assert sha(b"hello") in err["message"]
    check_error(client.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    assert blob_rows(app) == []
    assert uploads_dir(location) == []


def test_wrong_sha512_digest_on_put(client, app, location):
    loc, _ = open_session(client)
    assert patch(client, loc, b"hello", start=0).status_code == 202
    check_error(client.put(f"{loc}?digest={sha(b'bye', 'sha512')}"), 400, "DIGEST_INVALID")
    assert blob_rows(app) == []
    assert uploads_dir(location) == []


@pytest.mark.parametrize("query", ["", "?digest=", "?digest=sha256:abc", "?digest=md5:" + "0" * 32,
                                   "?digest=sha256:" + "A" * 64])
def test_put_without_a_valid_digest_keeps_the_session(client, app, location, query):
    loc, session_id = open_session(client)
    assert patch(client, loc, b"hello", start=0).status_code == 202
    check_error(client.put(f"{loc}{query}", data=b" world"), 400, "DIGEST_INVALID")
    assert client.get(loc).headers["Range"] == "0-4"  # nothing appended, still open
    assert blob_rows(app) == []
    resp = client.put(f"{loc}?digest={sha(b'hello world')}", data=b" world")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert uploads_dir(location) == []


def test_cancel(client, app, location):
    loc, _ = open_session(client)
    assert patch(client, loc, b"abc", start=0).status_code == 202
    resp = client.delete(loc)
    assert resp.status_code == 204
    assert uploads_dir(location) == []
    check_error(client.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    check_error(client.delete(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    check_error(patch(client, loc, b"d", start=3), 404, "BLOB_UPLOAD_UNKNOWN")
    check_error(client.put(f"{loc}?digest={sha(b'abc')}"), 404, "BLOB_UPLOAD_UNKNOWN")
    assert blob_rows(app) == []


def test_session_belongs_to_its_repository(client, app, location):
    loc, session_id = open_session(client, "team/one")
    other = f"/v2/team/two/blobs/uploads/{session_id}"
    check_error(client.get(other), 404, "BLOB_UPLOAD_UNKNOWN")
    check_error(patch(client, other, b"abc", start=0), 404, "BLOB_UPLOAD_UNKNOWN")
    check_error(client.put(f"{other}?digest={sha(b'')}"), 404, "BLOB_UPLOAD_UNKNOWN")
    check_error(client.delete(other), 404, "BLOB_UPLOAD_UNKNOWN")
    assert patch(client, loc, b"abc", start=0).status_code == 202  # untouched by the attempts
    assert client.put(f"{loc}?digest={sha(b'abc')}").status_code == 201


# Stable ids: parallel (xdist) workers must collect the same test names.
@pytest.mark.parametrize("session_id", [str(uuid.uuid4()), "not-a-uuid", "..", uuid.uuid4().hex,
                                        str(uuid.uuid1())],
                         ids=["uuid4", "not-a-uuid", "dot-dot", "uuid4-hex", "uuid1"])
def test_unknown_session(client, location, session_id):
    url = f"/v2/app/blobs/uploads/{session_id}"
    check_error(client.get(url), 404, "BLOB_UPLOAD_UNKNOWN")
    check_error(patch(client, url, b"abc", start=0), 404, "BLOB_UPLOAD_UNKNOWN")
    check_error(client.put(f"{url}?digest={sha(b'abc')}", data=b"abc"), 404, "BLOB_UPLOAD_UNKNOWN")
    check_error(client.delete(url), 404, "BLOB_UPLOAD_UNKNOWN")
    assert uploads_dir(location) == []


def test_idle_sessions_expire(client, app, location):
    uploads = sv(app).uploads
    assert uploads.timeout == 3600.0  # RegistryConfig.upload_session_timeout
    loc, _ = open_session(client)
    fresh_loc, _ = open_session(client)
    session_id = loc.rstrip("/").rsplit("/", 1)[-1]
    with sv(app).db.session() as s:  # idle for an hour and a second, as its row says (any instance's clock)
        s.execute(update(SessionRow).where(SessionRow.id == session_id).values(
            touched_at=utcnow() - timedelta(seconds=3601)))
        s.commit()
    assert uploads.expire() == [session_id]
    check_error(client.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")
    assert client.get(fresh_loc).status_code == 204
    assert len(uploads_dir(location)) == 1
    assert uploads.expire(now=utcnow() + timedelta(seconds=3601)) != []
    assert uploads_dir(location) == []


def test_session_limit(client, app, location):
    sv(app).uploads.max_sessions = 2
    open_session(client)
    open_session(client)
    check_error(client.post("/v2/app/blobs/uploads/"), 429, "TOOMANYREQUESTS")
    assert len(uploads_dir(location)) == 2


# -- size limit ---------------------------------------------------------------------------------------------------
def test_size_limit_monolithic(client, app, location):
    data = b"\0" * (LIMIT + 1)
    check_error(monolithic(client, "app", data), 413, "SIZE_INVALID")
    resp = client.post(f"/v2/app/blobs/uploads/?digest={sha(data)}", input_stream=io.BytesIO(data),
                       headers={"Transfer-Encoding": "chunked"},
                       environ_overrides={"CONTENT_LENGTH": "", "wsgi.input_terminated": True})
    check_error(resp, 413, "SIZE_INVALID")
    assert blob_rows(app) == []
    assert uploads_dir(location) == []


def test_size_limit_counts_the_whole_session(client, app, location):
    loc, _ = open_session(client)
    assert patch(client, loc, b"\0" * (LIMIT - 10), start=0).status_code == 202
    check_error(patch(client, loc, b"\0" * 11, start=LIMIT - 10), 413, "SIZE_INVALID")  # announced length
    check_error(client.get(loc), 404, "BLOB_UPLOAD_UNKNOWN")  # it could never be completed: gone
    assert uploads_dir(location) == []

    loc, _ = open_session(client)
    assert patch(client, loc, b"\0" * (LIMIT - 10), start=0).status_code == 202
    check_error(streamed(client, "PATCH", loc, b"\0" * 100), 413, "SIZE_INVALID")  # found while streaming
    assert uploads_dir(location) == []

    loc, _ = open_session(client)
    assert patch(client, loc, b"\0" * (LIMIT - 10), start=0).status_code == 202
    check_error(client.put(f"{loc}?digest={sha(b'x')}", data=b"\0" * 11), 413, "SIZE_INVALID")  # in the PUT
    assert blob_rows(app) == []
    assert uploads_dir(location) == []


def test_patch_without_length_or_chunked_has_no_body(client, location):
    """HTTP/1.1: no Content-Length and no Transfer-Encoding means no body: nothing is appended."""
    from werkzeug.test import EnvironBuilder, run_wsgi_app

    loc, _ = open_session(client)
    environ = EnvironBuilder(path=loc, method="PATCH", input_stream=io.BytesIO(b"abc")).get_environ()
    del environ["CONTENT_LENGTH"]
    _, status, headers = run_wsgi_app(client.application, environ, buffered=True)
    assert status.startswith("202")
    assert dict(headers)["Range"] == "0-0"
    # a Content-Range with neither: 411
    environ = EnvironBuilder(path=loc, method="PATCH", input_stream=io.BytesIO(b"abc"),
                             headers={"Content-Range": "0-2"}).get_environ()
    del environ["CONTENT_LENGTH"]
    body, status, _ = run_wsgi_app(client.application, environ, buffered=True)
    assert status.startswith("411")
    assert b"SIZE_INVALID" in b"".join(body)
    assert client.get(loc).headers["Range"] == "0-0"


# -- cross-repository mount ---------------------------------------------------------------------------------------
def test_mount_existing_blob(client, app, location):
    data = b"shared layer bytes"
    digest = sha(data)
    assert monolithic(client, "team/a", data).status_code == 201
    old = utcnow() - timedelta(hours=5)
    with sv(app).db.session() as s:
        s.get(Blob, digest).unreferenced_at = old
        s.commit()
    resp = client.post(f"/v2/team/b/blobs/uploads/?mount={digest}&from=team/a")
    assert resp.status_code == 201, resp.get_data(as_text=True)
    assert resp.headers["Location"] == f"/v2/team/b/blobs/{digest}"
    assert resp.headers["Docker-Content-Digest"] == digest
    with sv(app).db.session() as s:
        assert s.get(Blob, digest).unreferenced_at > old + timedelta(hours=4)  # a fresh GC grace period
    assert client.post(f"/v2/team/c/blobs/uploads/?mount={digest}").status_code == 201  # `from` is optional
    assert uploads_dir(location) == []


def test_mount_missing_blob_opens_a_session(client, app, location):
    digest = sha(b"nowhere")
    resp = client.post(f"/v2/team/b/blobs/uploads/?mount={digest}&from=team/a")
    assert resp.status_code == 202
    assert resp.headers["Range"] == "0-0"
    loc = resp.headers["Location"]
    assert client.put(f"{loc}?digest={digest}", data=b"nowhere").status_code == 201


def test_mount_bad_parameters(client, location):
    check_error(client.post("/v2/b/blobs/uploads/?mount=sha256:xyz&from=a"), 400, "DIGEST_INVALID")
    check_error(client.post(f"/v2/b/blobs/uploads/?mount={sha(b'x')}&from=Bad/Name"), 400, "NAME_INVALID")
    assert uploads_dir(location) == []


# -- Range requests -----------------------------------------------------------------------------------------------
def test_range_requests(client, app):
    data = os.urandom(1000)
    digest = sha(data)
    assert monolithic(client, "app", data).status_code == 201
    resp = client.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=10-19"})
    assert resp.status_code == 206
    assert resp.data == data[10:20]
    assert resp.headers["Content-Range"] == "bytes 10-19/1000"
    assert resp.headers["Docker-Content-Digest"] == digest
    resp.close()
    resp = client.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=-100"})
    assert (resp.status_code, resp.data) == (206, data[-100:])
    resp.close()
    resp = client.get(f"/v2/app/blobs/{digest}", headers={"Range": "bytes=5000-"})
    assert resp.status_code == 416
    assert resp.headers["Content-Range"] == "bytes */1000"
    assert resp.get_json()["errors"][0]["code"]
    assert sv(app).downloads.count(digest) == 0


def test_get_unknown_blob(client):
    digest = sha(b"unknown")
    check_error(client.get(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    resp = client.head(f"/v2/app/blobs/{digest}")
    assert resp.status_code == 404


# -- DELETE -------------------------------------------------------------------------------------------------------
def test_delete_unreferenced_blob(client, app, location):
    data = b"to be deleted"
    digest = sha(data)
    assert monolithic(client, "app", data).status_code == 201
    assert client.delete(f"/v2/app/blobs/{digest}").status_code == 202
    assert blob_rows(app) == []
    assert not (location / "blobs" / "sha256" / digest.split(":")[1]).exists()
    check_error(client.get(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")
    check_error(client.delete(f"/v2/app/blobs/{digest}"), 404, "BLOB_UNKNOWN")


def test_delete_referenced_blob_is_405_until_unreferenced(client, app, location):
    """A layer of a tag pushed over /api/v1: in use; once the tag is gone it can be deleted (torrent too)."""
    layer = layer_tar(b"payload")
    import json

    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2025-01-02T03:04:05Z",
                         "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
    for data, kind in ((layer, "layer"), (config, "config")):
        resp = client.post(f"/api/v1/blobs?kind={kind}&digest={sha(data)}", data=data,
                           headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 201, resp.get_data(as_text=True)
    resp = client.put("/api/v1/repositories/app/manifests/v1", json={"config": sha(config), "layers": [sha(layer)]})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    torrent = location / "torrents" / f"{sha(layer).split(':')[1]}.torrent"
    assert torrent.is_file()

    resp = client.delete(f"/v2/app/blobs/{sha(layer)}")
    err = check_error(resp, 405, "UNSUPPORTED")  # the spec allows 202/404/405 here (was a 409: issue 11)
    assert "in use" in err["message"] and resp.headers["Allow"] == "GET, HEAD"
    resp = client.get(f"/v2/app/blobs/{sha(layer)}")
    assert resp.data == layer
    resp.close()

    assert client.delete("/api/v1/repositories/app/tags/v1").status_code == 204
    assert client.delete(f"/v2/app/blobs/{sha(layer)}").status_code == 202
    assert not torrent.exists()
    assert sha(layer) not in blob_rows(app)
    assert sha(config) in blob_rows(app)  # untouched


def test_delete_while_downloading_keeps_the_download_whole(client, app):
    """A download in flight no longer makes DELETE a 409 (not a code the spec allows, issue 11): the delete goes
    ahead and the download, which opened the file, still gets every byte."""
    data = os.urandom(200_000)
    assert monolithic(client, "app", data).status_code == 201
    resp = client.get(f"/v2/app/blobs/{sha(data)}", buffered=False)
    assert client.delete(f"/v2/app/blobs/{sha(data)}").status_code == 202
    assert b"".join(resp.response) == data
    resp.close()
    check_error(client.get(f"/v2/app/blobs/{sha(data)}"), 404, "BLOB_UNKNOWN")


# -- bad names and digests ----------------------------------------------------------------------------------------
BAD_NAMES = ["App", "app_", "-app", "a..b", "app/", "a" * 256, "app/UPPER"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names(client, location, name):
    digest = sha(b"x")
    some_id = str(uuid.uuid4())
    for resp in (client.get(f"/v2/{name}/blobs/{digest}"), client.delete(f"/v2/{name}/blobs/{digest}"),
                 client.post(f"/v2/{name}/blobs/uploads/"), monolithic(client, name, b"x"),
                 client.get(f"/v2/{name}/blobs/uploads/{some_id}"),
                 patch(client, f"/v2/{name}/blobs/uploads/{some_id}", b"x", start=0),
                 client.put(f"/v2/{name}/blobs/uploads/{some_id}?digest={digest}"),
                 client.delete(f"/v2/{name}/blobs/uploads/{some_id}")):
        check_error(resp, 400, "NAME_INVALID")
    assert uploads_dir(location) == []


BAD_DIGESTS = ["sha256:abc", "sha256:" + "A" * 64, "md5:" + "0" * 32, "sha512:" + "0" * 64, "uploads",
               "sha256:" + "0" * 64 + "x"]


@pytest.mark.parametrize("digest", BAD_DIGESTS)
def test_bad_digests(client, app, location, digest):
    check_error(client.get(f"/v2/app/blobs/{digest}"), 400, "DIGEST_INVALID")
    assert client.head(f"/v2/app/blobs/{digest}").status_code == 400
    check_error(client.delete(f"/v2/app/blobs/{digest}"), 400, "DIGEST_INVALID")
    check_error(client.post(f"/v2/app/blobs/uploads/?digest={digest}", data=b"x"), 400, "DIGEST_INVALID")
    assert blob_rows(app) == []
    assert uploads_dir(location) == []


# -- over a real registry process ---------------------------------------------------------------------------------
def test_chunked_transfer_upload_over_http(registry_server):
    """What docker does, with requests: POST, one PATCH streamed with chunked transfer encoding, PUT ?digest=;
    then OCI-style chunks with Content-Range, a 416 for an out-of-order chunk, and Range reads."""
    import requests

    url = registry_server.url
    data = os.urandom(3 * 1024 * 1024 + 123)
    digest = sha(data)

    resp = requests.post(f"{url}/v2/library/big/blobs/uploads/", timeout=30)
    assert resp.status_code == 202, resp.text
    loc = resp.headers["Location"]

    def body():
        for i in range(0, len(data), 100_000):
            yield data[i:i + 100_000]

    resp = requests.patch(f"{url}{loc}", data=body(), headers={"Content-Type": "application/octet-stream"},
                          timeout=60)
    assert resp.status_code == 202, resp.text
    assert resp.request.headers.get("Transfer-Encoding") == "chunked"
    assert resp.headers["Range"] == f"0-{len(data) - 1}"
    resp = requests.put(f"{url}{resp.headers['Location']}?digest={digest}", timeout=60)
    assert resp.status_code == 201, resp.text
    assert resp.headers["Docker-Content-Digest"] == digest

    resp = requests.get(f"{url}/v2/library/big/blobs/{digest}", timeout=60)
    assert resp.status_code == 200 and resp.content == data
    resp = requests.get(f"{url}/v2/library/big/blobs/{digest}", headers={"Range": "bytes=100-199"}, timeout=60)
    assert resp.status_code == 206 and resp.content == data[100:200]
    resp = requests.get(f"{url}/v2/library/big/blobs/{digest}", headers={"Range": f"bytes={len(data)}-"},
                        timeout=60)
    assert resp.status_code == 416 and resp.headers["Content-Range"] == f"bytes */{len(data)}"

    # OCI chunks with Content-Range; one out of order
    small = os.urandom(300_000)
    resp = requests.post(f"{url}/v2/library/small/blobs/uploads/", timeout=30)
    loc = resp.headers["Location"]
    resp = requests.patch(f"{url}{loc}", data=small[:100_000], headers={"Content-Range": "0-99999"}, timeout=30)
    assert resp.status_code == 202 and resp.headers["Range"] == "0-99999"
    resp = requests.patch(f"{url}{loc}", data=small[200_000:], headers={"Content-Range": "200000-299999"}, timeout=30)
    assert resp.status_code == 416 and resp.headers["Range"] == "0-99999"
    assert resp.json()["errors"][0]["code"] == "BLOB_UPLOAD_INVALID"
    resp = requests.patch(f"{url}{loc}", data=small[100_000:200_000], headers={"Content-Range": "100000-199999"},
                          timeout=30)
    assert resp.status_code == 202
    resp = requests.put(f"{url}{loc}?digest={sha(small)}", data=small[200_000:],
                        headers={"Content-Range": "200000-299999"}, timeout=30)
    assert resp.status_code == 201, resp.text
    assert requests.get(f"{url}/v2/library/small/blobs/{sha(small)}", timeout=30).content == small
    assert [p.name for p in (registry_server.location / "uploads").iterdir()] == []


@pytest.mark.parametrize("url", ["/v2/app/blobs/{d}", "/api/v1/blobs/{d}"])
def test_head_gives_an_unreferenced_blob_a_fresh_grace_period(client, app, url):
    """A client that HEADs a blob skips uploading it and names it in its next manifest: GC must not take it
    in between, even if it was uploaded long ago and never used."""
    from datetime import timedelta

    from docket.registry.models import Blob, utcnow

    data = b"uploaded long ago, referenced by nothing yet"
    assert monolithic(client, "app", data).status_code == 201
    services = sv(app)
    with services.db.session() as s:
        s.get(Blob, sha(data)).unreferenced_at = utcnow() - timedelta(hours=2)
        s.commit()
    assert client.head(url.format(d=sha(data))).status_code == 200
    assert services.gc.run_once(now=utcnow() + timedelta(seconds=60)) == []
    assert client.head(f"/v2/app/blobs/{sha(data)}").status_code == 200
