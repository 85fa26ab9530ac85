"""Red-team pass over the registry after issue 11: what a stranger found with curl and raw sockets against a
real ``docket-registry`` started with default flags.

* cheroot's own answers (request line or headers too long, malformed request line or header, unsupported
  version or transfer coding, bad Content-Length) were plain text: now each API's JSON error shape;
* request framing that a proxy in front could be smuggled through: a negative Content-Length left the body to be
  parsed as the next request, a chunked body the app did not read was too, duplicate Content-Length /
  Authorization headers were resolved silently (last wins), ``+5`` / ``1_0`` passed ``int()``;
* Range: a suffix longer than the blob (``bytes=-100`` on 11 bytes) was a 416; RFC 9110 says all of it (206);
* manifests: ``schemaVersion: 2.0`` (or ``true``) was stored; a foreign layer URL with a newline passed (urlsplit
  drops it silently);
* openapi.json had no 408 on the routes that take a body.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from tests.support.procs import free_port
from tests.support.registry_server import RegistryServer
from tests.support.robustness_rows import record
from tests.support.tools import need

AREA = "registry red team"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


# -- fixtures and helpers ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """One real registry (default flags, loopback) for every raw-socket case of this module."""
    need("ctorrent")
    need("opentracker")
    tmp = tmp_path_factory.mktemp("redteam")
    srv = RegistryServer(location=tmp / "registry", port=free_port(), tracker_port=free_port(),
                         log=tmp / "registry.log")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def raw(srv: RegistryServer, data: bytes, timeout: float = 10.0) -> bytes:
    """Send ``data`` as is and read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                raise AssertionError(f"the server kept the connection open; so far: {out[:300]!r}") from None
            if not chunk:
                return out
            out += chunk


def parse(answer: bytes) -> tuple[int, dict[str, str], object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# -- the HTTP server's own answers ------------------------------------------------------------------------------
SERVER_ERRORS = [
    # (case, request, status)
    ("request line over 64 KiB", b"GET /PATH" + b"a" * 66_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("headers over 64 KiB", b"GET /PATH HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 66_000 + b"\r\n\r\n", 413),
    ("request line without a version", b"GET /PATH\r\nHost: x\r\n\r\n", 400),
    ("header line without a colon", b"GET /PATH HTTP/1.1\r\nHost x\r\n\r\n", 400),
    ("HTTP/9.9", b"GET /PATH HTTP/9.9\r\nHost: x\r\n\r\n", 505),
    ("Transfer-Encoding: gzip", b"POST /PATH HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("Content-Length: abc", b"PUT /PATH HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400),
]


def test_server_errors_have_each_apis_json_shape(server: RegistryServer) -> None:
    """Answers cheroot makes before the app runs: the spec's shape under /v2 (with the API version header), the
    /api/v1 shape elsewhere; never plain text."""
    seen = []
    for case, request, status in SERVER_ERRORS:
        for prefix, v2 in ((b"/v2/", True), (b"/api/v1/", False)):
            got, headers, body = parse(raw(server, request.replace(b"/PATH", prefix + b"r/blobs/uploads/", 1)))
            assert got == status, (case, prefix, got)
            assert headers["content-type"] == "application/json" and headers["connection"] == "close", headers
            if v2:
                assert set(body) == {"errors"} and set(body["errors"][0]) == {"code", "message", "detail"}, body
                assert headers.get("docker-distribution-api-version") == "registry/2.0", headers
            else:
                assert set(body) == {"error"} and body["error"]["code"] and body["error"]["message"], body
        seen.append(f"{status}")
    _, _, body = parse(raw(server, b"GARBAGE\r\n\r\n"))
    assert body["error"]["code"] == "INVALID_REQUEST", body
    record(AREA, "errors the HTTP server answers itself (414, 413 headers, 400 request line / header / "
           "Content-Length, 505, 501 transfer coding)",
           "JSON: the spec's {errors: [{code, message, detail}]} under /v2 (with Docker-Distribution-API-Version), "
           "{error: {...}} elsewhere; was text/plain")


FRAMING = [
    ("negative Content-Length", b"Content-Length: -5\r\n"),
    ("Content-Length +5", b"Content-Length: +5\r\n"),
    ("Content-Length 1_0", b"Content-Length: 1_0\r\n"),
    ("two Content-Length", b"Content-Length: 0\r\nContent-Length: 50\r\n"),
    ("Content-Length and chunked", b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n"),
    ("two Authorization", b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n"),
    ("two Host", b"Host: y\r\n"),
    ("whitespace before the colon", b"Content-Length : 0\r\n"),
    ("obsolete line folding", b"X-A: a\r\n b\r\n"),
]


@pytest.mark.parametrize("case,headers", FRAMING, ids=[c for c, _ in FRAMING])
def test_ambiguous_framing_is_400_and_nothing_is_smuggled(server: RegistryServer, case: str,
                                                          headers: bytes) -> None:
    """A request whose length or credentials two parsers could read differently is refused, and what follows it on
    the connection is never answered as a request of its own."""
    smuggled = b"GET /v2/_catalog HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = raw(server, b"PATCH /v2/r/blobs/uploads/x HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n" + smuggled)
    status, hdrs, body = parse(answer)
    assert status == 400 and hdrs["connection"] == "close", answer[:300]
    assert body["errors"][0]["code"] == "UNSUPPORTED", body
    assert answer.count(b"HTTP/1.1 ") == 1, answer  # the catalog request was not run
    record(AREA, f"request framing: {case}, a second request behind it",
           f"400 ({body['errors'][0]['message'][:60]}), connection closed, the second request not run")


def test_unread_chunked_body_closes_the_connection(server: RegistryServer) -> None:
    """cheroot drains an unread Content-Length body but not a chunked one: its bytes became the next request."""
    body = b"5\r\nhello\r\n0\r\n\r\n"
    answer = raw(server, b"POST /v2/r/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + body + b"GET /v2/_catalog HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 202"), answer[:200]
    assert b"\r\nConnection: close\r\n" in answer.split(b"\r\n\r\n")[0], answer[:400]
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    record(AREA, "chunked body the app does not read (POST starting an upload), a request behind it",
           "answered 202 with Connection: close; the leftover bytes are not parsed as a request (was a 400 for a "
           "'request line' made of the body)")


# -- app level (Flask test client) --------------------------------------------------------------------------------
def test_suffix_range_longer_than_the_blob_is_all_of_it(client: FlaskClient) -> None:
    data = b"hello layer"
    d = sha(data)
    assert client.post(f"/v2/r/blobs/uploads/?digest={d}", data=data).status_code == 201
    for url in (f"/v2/r/blobs/{d}", f"/api/v1/blobs/{d}"):
        r = client.get(url, headers={"Range": "bytes=-100"})
        assert r.status_code == 206 and r.data == data, (url, r.status_code)
        assert r.headers["Content-Range"] == f"bytes 0-{len(data) - 1}/{len(data)}"
        r = client.get(url, headers={"Range": "bytes=-3"})
        assert r.status_code == 206 and r.data == data[-3:]
        r = client.get(url, headers={"Range": "bytes=-0"})
        assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    record(AREA, "Range bytes=-100 on an 11-byte blob (/v2 and /api/v1)",
           "206 bytes 0-10/11 (RFC 9110: a longer suffix selects all of it); was 416. bytes=-0 stays 416")


def _manifest(client: FlaskClient, **changes: object) -> dict:
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
    assert client.post(f"/v2/r/blobs/uploads/?digest={sha(config.encode())}", data=config).status_code == 201
    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config.encode()),
                       "size": len(config)}, "layers": []}
    body.update(changes)
    return body


def test_schema_version_must_be_the_integer_2(client: FlaskClient) -> None:
    for version, text in ((2.0, "2.0"), (True, "true"), ("2", '"2"')):
        body = json.dumps(_manifest(client)).replace('"schemaVersion": 2', f'"schemaVersion": {text}')
        r = client.put("/v2/r/manifests/v1", data=body, headers={"Content-Type": OCI_MANIFEST})
        assert r.status_code == 400 and r.json["errors"][0]["code"] == "MANIFEST_INVALID", (version, r.json)
        assert "schemaVersion must be 2" in r.json["errors"][0]["message"], r.json
    assert client.get("/v2/r/manifests/v1").status_code == 404
    record(AREA, "manifest with schemaVersion 2.0 / true / \"2\"",
           "400 MANIFEST_INVALID 'schemaVersion must be 2' (2.0 was stored: Go clients cannot read it into an int)")


@pytest.mark.parametrize("url", ["https://example.invalid/a\n", "https://example.invalid/a\tb",
                                 "https://example.invalid/a b", "https://exa\rmple.invalid/a"])
def test_foreign_layer_url_with_control_characters_is_refused(client: FlaskClient, url: str) -> None:
    layer = {"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": sha(b"foreign"),
             "size": 7, "urls": [url]}
    r = client.put("/v2/r/manifests/v1", data=json.dumps(_manifest(client, layers=[layer])),
                   headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 400 and r.json["errors"][0]["code"] == "MANIFEST_INVALID", r.json
    assert client.get("/v2/r/manifests/v1").status_code == 404
    layer["urls"] = ["https://example.invalid/a"]
    r = client.put("/v2/r/manifests/v1", data=json.dumps(_manifest(client, layers=[layer])),
                   headers={"Content-Type": OCI_MANIFEST})
    assert r.status_code == 201, r.json
    record(AREA, f"foreign layer url {url!r}",
           "400 MANIFEST_INVALID (urlsplit dropped tabs and newlines, so it was stored); the clean URL is 201")


def test_openapi_documents_408_on_every_body_route() -> None:
    doc = json.loads((Path(__file__).parents[2] / "docket/registry/openapi.json").read_text())
    routes = []
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if method in ("put", "post", "patch") and path != "/api/v1/admin/scrub":
                ref = op["responses"]["408"]["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("V2Errors" if path.startswith("/v2") else "/Error"), (method, path, ref)
                routes.append(f"{method.upper()} {path}")
    assert len(routes) >= 7, routes
    record(AREA, "openapi.json: 408 on routes that take a body",
           f"documented on all {len(routes)} (V2Errors under /v2, Error under /api/v1); was on none")


@pytest.mark.parametrize("size_line", [b"zz", b"0x5", b"+5", b"-1", b"1_0", b"5 ", b"a" * 10_000],
                         ids=["zz", "0x5", "+5", "-1", "1_0", "5-space", "10k-line"])
def test_malformed_chunk_size_is_400_and_stores_nothing(server: RegistryServer, size_line: bytes) -> None:
    """cheroot read chunk sizes with int(x, 16): 0x5, +5, 1_0 were taken (a proxy may read them otherwise), -1
    ended the body, zz was a 500 with a traceback, and the size line had no length limit."""
    import requests

    loc = requests.post(f"{server.url}/v2/r/blobs/uploads/", timeout=10).headers["Location"]
    answer = raw(server, f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
                 + size_line + b"\r\nhello\r\n0\r\n\r\nGET /v2/_catalog HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = parse(answer)
    assert status == 400 and headers["connection"] == "close", answer[:300]
    assert body["errors"][0]["code"] == "BLOB_UPLOAD_INVALID", body
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert requests.get(server.url + loc, timeout=10).headers["Range"] == "0-0"  # nothing stored
    good = raw(server, f"PATCH {loc} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               .encode() + b"5;ext=1\r\nhello\r\n0\r\n\r\n")
    assert good.startswith(b"HTTP/1.1 202") and b"\r\nRange: 0-4\r\n" in good, good[:300]
    record(AREA, f"chunked body with chunk-size line {size_line[:12]!r}{'...' if len(size_line) > 12 else ''}",
           "400 BLOB_UPLOAD_INVALID, nothing stored, connection closed; a well-formed chunk (with extension) is "
           "taken after it")
