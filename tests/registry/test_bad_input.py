"""Bad input, case by case: every one must get a 4xx (never a 5xx), a JSON error with a clear message, and leave
the registry unchanged (listing, blobs/, torrents/, uploads/).

Server-side cases use the Flask app (create_app + test_client, seeding disabled, push and read tokens
configured so access control is always on). Limits that belong to cheroot (header and request-line size) and
HTTPS use a real ``docket-registry`` subprocess (``--no-seeding``: no tracker or ctorrent). Client-side cases run
the real ``docket`` CLI through click's CliRunner.

Covered elsewhere (not repeated here): registry down (client/test_unit::test_registry_down_is_a_clear_error),
corrupt .torrent served (client/test_unit::test_garbage_torrent_and_bad_record_are_integrity_errors), info-hash
mismatch (client/test_unit::test_info_hash_mismatch_is_refused_before_download), bad references on the client
(client/test_unit::test_bad_reference_fails_fast_without_network).

With DOCKET_BAD_INPUT_RESULTS=FILE each case appends its observed outcome to FILE (JSON lines);
``scripts/bad_input_table.py FILE`` renders them as Markdown (docs/robustness.md).
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder, run_wsgi_app

from docket.client.cli import cli
from docket.registry import RegistryConfig
from tests.support.procs import free_port, stop_process, tail, wait_until
from tests.support.registry_images import _add, build_image_tar

REPO_ROOT = Path(__file__).resolve().parents[2]
LIMIT = 256 * 1024
PUSH_TOKEN = "push-token-0123456789abcdef"
READ_TOKEN = "read-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {PUSH_TOKEN}"}
RESULTS = os.environ.get("DOCKET_BAD_INPUT_RESULTS")


def record(area: str, case: str, observed: str, detail: str = "") -> None:
    """One row of the robustness table (only when DOCKET_BAD_INPUT_RESULTS is set)."""
    if RESULTS:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps({"area": area, "case": case, "observed": observed, "detail": detail[:160]}) + "\n")


# -- the app under test -----------------------------------------------------------------------------------------

pytestmark = pytest.mark.registry_config(max_upload_size=LIMIT, auth_tokens=(PUSH_TOKEN,), read_tokens=(READ_TOKEN,))


@pytest.fixture
def image(tmp_path: Path) -> Callable[..., bytes]:
    counter = iter(range(1000))

    def make(**kw: Any) -> bytes:
        path = tmp_path / f"img{next(counter)}.tar"
        build_image_tar(path, **kw)
        return path.read_bytes()
    return make


@pytest.fixture
def seeded(client: FlaskClient, image) -> dict:
    """A registry holding one image, so "unchanged" means more than "still empty"."""
    resp = client.put("/api/v1/repositories/keep/tags/v1", data=image(payload=b"keep me\n"),
                      headers={"Content-Type": "application/x-tar", **AUTH})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


def snapshot(client: FlaskClient, location: Path) -> dict:
    resp = client.get("/api/v1/images", headers=AUTH)
    assert resp.status_code == 200
    return {
        "images": resp.get_json(),
        "blobs": sorted(p.name for p in (location / "blobs" / "sha256").iterdir()),
        "torrents": sorted(p.name for p in (location / "torrents").iterdir()),
        "uploads": sorted(p.name for p in (location / "uploads").iterdir()),
    }


def check_error(resp: Any, status: int | tuple[int, ...], code: str | tuple[str, ...] | None = None) -> dict:
    """4xx, JSON ``{"error": {code, message, hint}}`` with a non-empty message."""
    text = resp.get_data(as_text=True)
    statuses = (status,) if isinstance(status, int) else status
    assert resp.status_code in statuses, text
    assert 400 <= resp.status_code < 500, text
    assert resp.mimetype == "application/json", text
    body = resp.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "hint"}, body
    assert isinstance(body["error"]["message"], str) and len(body["error"]["message"]) > 5, body
    if code is not None:
        codes = (code,) if isinstance(code, str) else code
        assert body["error"]["code"] in codes, body
    return body["error"]


def put(client: FlaskClient, path: str, data: bytes, headers: dict | None = None, **kw: Any) -> Any:
    return client.put(path, data=data, headers={"Content-Type": "application/x-tar", **AUTH, **(headers or {})},
                      **kw)


TAG_PATH = "/api/v1/repositories/{}/tags/{}"


# -- references --------------------------------------------------------------------------------------------------

BAD_REFS = {
    # id: (repository part of the path, tag part, acceptable statuses)
    "uppercase repository": ("Team/App", "v1", (400,)),
    "illegal character": ("app$name", "v1", (400,)),
    "unicode repository": ("\u00e4pp", "v1", (400,)),
    "dot-dot component": ("a/../b", "v1", (400, 404)),
    "only dot-dot": ("..", "v1", (400, 404)),
    "double slash": ("a//b", "v1", (400,)),
    "leading slash": ("/app", "v1", (400, 404)),
    "trailing slash": ("app/", "v1", (400,)),
    "shell metacharacters ;": ("app;rm -rf %2F", "v1", (400,)),
    "shell metacharacters $()": ("$(id)", "v1", (400,)),
    "shell metacharacters backtick|": ("a`id`|b", "v1", (400,)),
    "over-long repository": ("/".join(["a" * 60] * 5), "v1", (400,)),
    "over-long tag": ("app", "t" * 129, (400,)),
    "empty tag": ("app", "", (400, 404)),
    "tag starting with -": ("app", "-v1", (400,)),
    "tag starting with .": ("app", ".v1", (400,)),
    "digest where a tag is expected": ("app", "sha256:" + "a" * 64, (400,)),
    "tag with space": ("app", "v 1", (400,)),
    "NUL byte in name": ("app%00x", "v1", (400,)),
}


@pytest.mark.parametrize("case", list(BAD_REFS))
def test_bad_reference_push(client, location, image, seeded, case):
    repo, tag, statuses = BAD_REFS[case]
    before = snapshot(client, location)
    resp = put(client, TAG_PATH.format(repo, tag), image())
    err = check_error(resp, statuses, ("INVALID_REFERENCE", "NOT_FOUND"))
    assert snapshot(client, location) == before
    record("reference", f"push {case}", f"{resp.status_code} {err['code']}", err["message"])


@pytest.mark.parametrize("method", ["GET", "DELETE"])
@pytest.mark.parametrize("case", ["uppercase repository", "double slash", "over-long tag",
                                  "digest where a tag is expected"])
def test_bad_reference_read_and_delete(client, location, seeded, case, method):
    repo, tag, statuses = BAD_REFS[case]
    before = snapshot(client, location)
    resp = client.open(TAG_PATH.format(repo, tag), method=method, headers=AUTH)
    err = check_error(resp, statuses, "INVALID_REFERENCE")
    assert snapshot(client, location) == before
    record("reference", f"{method} {case}", f"{resp.status_code} {err['code']}", err["message"])


@pytest.mark.parametrize("digest", ["sha256:XYZ", "md5:" + "a" * 32, "sha256:" + "A" * 64, "sha256:" + "a" * 63,
                                    "..%2F..%2Fetc%2Fpasswd"])
def test_bad_digest(client, location, seeded, digest):
    before = snapshot(client, location)
    for path in (f"/api/v1/blobs/{digest}", f"/api/v1/blobs/{digest}/torrent"):
        resp = client.get(path, headers=AUTH)
        err = check_error(resp, (400, 404), ("INVALID_REQUEST", "INVALID_REFERENCE", "NOT_FOUND"))
    assert snapshot(client, location) == before
    record("reference", f"blob digest {digest[:24]}", f"{resp.status_code} {err['code']}", err["message"])


# -- uploads -----------------------------------------------------------------------------------------------------

def _member(name: str, **fields: Any) -> Callable[[tarfile.TarFile, dict], None]:
    def mutate(tar: tarfile.TarFile, entry: dict) -> None:
        _add(tar, name, b"x" if fields.get("type", tarfile.REGTYPE) == tarfile.REGTYPE else b"", **fields)
    return mutate


def _cut_in(data: bytes, member: str) -> bytes:
    """The tarball cut a few bytes into ``member``'s data."""
    with tarfile.open(fileobj=io.BytesIO(data)) as t:
        return data[:t.getmember(member).offset_data + 5]


def _gzip_of(img: Callable[..., bytes]) -> bytes:
    import gzip
    return gzip.compress(img())


BAD_TARS: dict[str, Callable[[Callable[..., bytes]], bytes]] = {
    "not a tar": lambda img: b"GIF89a this is not a tar archive " * 64,
    "gzip-compressed tarball": _gzip_of,
    "truncated tar": lambda img: img()[:1536],
    "tar cut mid-member": lambda img: _cut_in(img(), "manifest.json"),
    "tar without manifest.json": lambda img: img(skip=("manifest.json",)),
    "manifest points at a missing config": lambda img: img(
        manifest=[{"Config": "nope.json", "RepoTags": ["app:v1"], "Layers": []}]),
    "manifest points at a missing layer": lambda img: img(
        mutate=lambda t, e: e["Layers"].append("0" * 64 + "/layer.tar")),
    "manifest is not JSON": lambda img: img(manifest="{not json"),
    "manifest is an empty list": lambda img: img(manifest=[]),
    "absolute member path": lambda img: img(mutate=_member("/etc/cron.d/evil")),
    "dot-dot member path": lambda img: img(mutate=_member("../../evil")),
    "escaping symlink": lambda img: img(mutate=_member("link", type=tarfile.SYMTYPE, linkname="../../../etc/shadow")),
    "absolute symlink": lambda img: img(mutate=_member("link", type=tarfile.SYMTYPE, linkname="/etc/shadow")),
    "config that is not the image id": lambda img: img(mutate=lambda t, e: e.update(Config="f" * 64 + ".json")
                                                       or _add(t, "f" * 64 + ".json", b"{}")),
    "all zero blocks": lambda img: b"\0" * 10240,
}


@pytest.mark.parametrize("case", list(BAD_TARS))
def test_bad_tarball(client, location, image, seeded, case):
    data = BAD_TARS[case](image)
    before = snapshot(client, location)
    resp = put(client, TAG_PATH.format("app", "v1"), data)
    err = check_error(resp, (400, 415), ("INVALID_IMAGE", "INVALID_REQUEST"))
    assert snapshot(client, location) == before
    record("upload", case, f"{resp.status_code} {err['code']}", err["message"])


def test_bad_tarball_does_not_replace_existing_tag(client, location, image, seeded):
    before = snapshot(client, location)
    resp = put(client, TAG_PATH.format("keep", "v1"), BAD_TARS["escaping symlink"](image))
    err = check_error(resp, 400, "INVALID_IMAGE")
    assert snapshot(client, location) == before
    assert client.get(TAG_PATH.format("keep", "v1"), headers=AUTH).get_json() == seeded
    record("upload", "bad tarball over an existing tag", f"{resp.status_code} {err['code']}", err["message"])


def _empty(client, img):
    return client.put(TAG_PATH.format("app", "v1"), data=b"", headers={"Content-Type": "application/x-tar", **AUTH},
                      environ_overrides={"CONTENT_LENGTH": "0"})


def _over_limit_length(client, img):
    return put(client, TAG_PATH.format("app", "v1"), b"\0" * (LIMIT + 1))


def _over_limit_chunked(client, img):
    return client.put(TAG_PATH.format("app", "v1"), input_stream=io.BytesIO(b"\0" * (LIMIT * 3)),
                      headers={"Content-Type": "application/x-tar", "Transfer-Encoding": "chunked", **AUTH},
                      environ_overrides={"CONTENT_LENGTH": "", "wsgi.input_terminated": True})


def _length_too_big(client, img):
    data = img()
    return client.put(TAG_PATH.format("app", "v1"), input_stream=io.BytesIO(data),
                      headers={"Content-Type": "application/x-tar", **AUTH},
                      environ_overrides={"CONTENT_LENGTH": str(len(data) + 4096)})


def _length_too_small(client, img):
    data = img()
    return client.put(TAG_PATH.format("app", "v1"), input_stream=io.BytesIO(data),
                      headers={"Content-Type": "application/x-tar", **AUTH},
                      environ_overrides={"CONTENT_LENGTH": str(len(data) // 2)})


def _length_not_a_number(client, img):
    data = img()
    return client.put(TAG_PATH.format("app", "v1"), input_stream=io.BytesIO(data),
                      headers={"Content-Type": "application/x-tar", **AUTH},
                      environ_overrides={"CONTENT_LENGTH": "12abc"})


def _wrong_content_type(client, img):
    return put(client, TAG_PATH.format("app", "v1"), img(), headers={"Content-Type": "application/json"})


def _multipart(client, img):
    return client.put(TAG_PATH.format("app", "v1"), headers=AUTH,
                      data={"file": (io.BytesIO(img()), "image.tar")}, content_type="multipart/form-data")


def _no_length(client, img):
    environ = EnvironBuilder(path=TAG_PATH.format("app", "v1"), method="PUT", input_stream=io.BytesIO(img()),
                             content_type="application/x-tar", headers=AUTH).get_environ()
    del environ["CONTENT_LENGTH"]
    body, status, headers = run_wsgi_app(client.application, environ, buffered=True)
    return client.application.response_class(b"".join(body), status=status, headers=headers)


BAD_BODIES = {
    "empty body": (_empty, 400, "INVALID_REQUEST"),
    "over the size limit (Content-Length)": (_over_limit_length, 413, "TOO_LARGE"),
    "over the size limit (chunked)": (_over_limit_chunked, 413, "TOO_LARGE"),
    "Content-Length larger than the body": (_length_too_big, 400, "INVALID_REQUEST"),
    "Content-Length smaller than the body": (_length_too_small, 400, ("INVALID_REQUEST", "INVALID_IMAGE")),
    "Content-Length not a number": (_length_not_a_number, (400, 411), ("INVALID_REQUEST", "LENGTH_REQUIRED")),
    "no Content-Length, not chunked": (_no_length, 411, "LENGTH_REQUIRED"),
    "wrong Content-Type": (_wrong_content_type, 415, "UNSUPPORTED_MEDIA_TYPE"),
    "multipart form (the original's upload)": (_multipart, 415, "UNSUPPORTED_MEDIA_TYPE"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_bad_body(client, location, image, seeded, case):
    send, status, code = BAD_BODIES[case]
    before = snapshot(client, location)
    resp = send(client, image)
    err = check_error(resp, status, code)
    assert snapshot(client, location) == before
    record("upload", case, f"{resp.status_code} {err['code']}", err["message"])


# -- HTTP --------------------------------------------------------------------------------------------------------

BAD_HTTP = {
    "unknown route": ("GET", "/api/v1/nothing-here", {}, 404, "NOT_FOUND"),
    "unknown API version": ("GET", "/api/v2/images", {}, 404, "NOT_FOUND"),
    "wrong method on a tag (POST)": ("POST", TAG_PATH.format("app", "v1"), {}, 405, "METHOD_NOT_ALLOWED"),
    "wrong method on the listing (DELETE)": ("DELETE", "/api/v1/images", {}, 405, "METHOD_NOT_ALLOWED"),
    "wrong method on a blob (PUT)": ("PUT", "/api/v1/blobs/sha256:" + "a" * 64, {}, 405, "METHOD_NOT_ALLOWED"),
    "malformed query (bad percent-encoding)": ("GET", "/api/v1/images?q=%zz&x=%", {}, 400, "INVALID_REQUEST"),
    "malformed query (not UTF-8)": ("GET", "/api/v1/images?q=%ff%fe", {}, 400, "INVALID_REQUEST"),
    "oversized header (app limit)": ("GET", "/api/v1/images", {"X-Junk": "j" * 20000}, 431, "HEADERS_TOO_LARGE"),
    "unsatisfiable Range": ("GET", "BLOB", {"Range": "bytes=999999999-"}, 416, "RANGE_NOT_SATISFIABLE"),
}


@pytest.mark.parametrize("case", list(BAD_HTTP))
def test_bad_http(client, location, seeded, case):
    method, path, headers, status, code = BAD_HTTP[case]
    if path == "BLOB":
        path = seeded["layers"][0]["blob_url"]
    before = snapshot(client, location)
    resp = client.open(path, method=method, headers={**AUTH, **headers}, data=b"x" if method == "PUT" else None)
    err = check_error(resp, status, code)
    assert snapshot(client, location) == before
    record("http", case, f"{resp.status_code} {err['code']}", err["message"])


# -- access control ----------------------------------------------------------------------------------------------

BAD_AUTH = {
    # id: (method, path, Authorization header or None, status, code, word the message must contain)
    "push without a token": ("PUT", TAG_PATH.format("app", "v1"), None, 401, "UNAUTHORIZED", "missing"),
    "push with a wrong token": ("PUT", TAG_PATH.format("app", "v1"), "Bearer nope-nope-nope", 401, "UNAUTHORIZED",
                                "invalid"),
    "push with a token prefix": ("PUT", TAG_PATH.format("app", "v1"), f"Bearer {PUSH_TOKEN[:-1]}", 401,
                                 "UNAUTHORIZED", "invalid"),
    "push with Basic auth": ("PUT", TAG_PATH.format("app", "v1"), "Basic dXNlcjpwYXNz", 401, "UNAUTHORIZED",
                             "invalid"),
    "push with an empty Bearer": ("PUT", TAG_PATH.format("app", "v1"), "Bearer ", 401, "UNAUTHORIZED", "invalid"),
    "push with a read token": ("PUT", TAG_PATH.format("app", "v1"), f"Bearer {READ_TOKEN}", 403, "FORBIDDEN",
                               "only read"),
    "delete without a token": ("DELETE", TAG_PATH.format("keep", "v1"), None, 401, "UNAUTHORIZED", "missing"),
    "delete with a read token": ("DELETE", TAG_PATH.format("keep", "v1"), f"Bearer {READ_TOKEN}", 403,
                                 "FORBIDDEN", "only read"),
    "read without a token": ("GET", "/api/v1/images", None, 401, "UNAUTHORIZED", "missing"),
    "read with a wrong token": ("GET", TAG_PATH.format("keep", "v1"), "Bearer wrong", 401, "UNAUTHORIZED",
                                "invalid"),
    "blob download without a token": ("GET", "BLOB", None, 401, "UNAUTHORIZED", "missing"),
    "blob upload without a token": ("POST", "/api/v1/blobs?kind=layer", None, 401, "UNAUTHORIZED", "missing"),
    "blob upload with a wrong token": ("POST", "/api/v1/blobs?kind=config", "Bearer nope-nope-nope", 401,
                                       "UNAUTHORIZED", "invalid"),
    "blob upload with a read token": ("POST", "/api/v1/blobs?kind=layer", f"Bearer {READ_TOKEN}", 403, "FORBIDDEN",
                                      "only read"),
    "manifest put without a token": ("PUT", "/api/v1/repositories/app/manifests/v1", None, 401, "UNAUTHORIZED",
                                     "missing"),
    "manifest put with a read token": ("PUT", "/api/v1/repositories/app/manifests/v1", f"Bearer {READ_TOKEN}", 403,
                                       "FORBIDDEN", "only read"),
    "manifest read without a token": ("GET", "/api/v1/repositories/keep/manifests/v1", None, 401, "UNAUTHORIZED",
                                      "missing"),
    "whitelist without a token": ("GET", "/api/v1/tracker/whitelist", None, 401, "UNAUTHORIZED", "missing"),
}


@pytest.mark.parametrize("case", list(BAD_AUTH))
def test_bad_auth(client, location, image, seeded, case):
    method, path, auth, status, code, word = BAD_AUTH[case]
    if path == "BLOB":
        path = seeded["layers"][0]["blob_url"]
    headers = {"Content-Type": "application/x-tar"}
    if auth is not None:
        headers["Authorization"] = auth
    before = snapshot(client, location)
    resp = client.open(path, method=method, headers=headers, data=image() if method in ("PUT", "POST") else None)
    err = check_error(resp, status, code)
    assert word in err["message"], err
    assert resp.headers["WWW-Authenticate"].startswith('Bearer realm="docket"')
    if status == 401:
        assert "DOCKET_TOKEN" in (err["hint"] or ""), err
    for tok in (PUSH_TOKEN, READ_TOKEN):
        assert tok not in resp.get_data(as_text=True)
    assert snapshot(client, location) == before
    record("auth", case, f"{resp.status_code} {err['code']}", err["message"])


def test_auth_allows_what_it_should(client, location, image, seeded):
    """Not bad input: the other side of the same rules (open endpoints, read token reads, push token pushes)."""
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    assert client.get("/api/v1/images", headers=read).status_code == 200
    assert client.get(seeded["layers"][0]["blob_url"], headers=read).status_code == 200
    assert client.get(TAG_PATH.format("keep", "v1"), headers={"Authorization": f"bearer {PUSH_TOKEN}"}) \
        .status_code == 200
    assert put(client, TAG_PATH.format("app", "v1"), image()).status_code == 201
    assert client.delete(TAG_PATH.format("app", "v1"), headers=AUTH).status_code == 204


def test_open_registry_needs_no_token(tmp_path, make_app):
    """No token configured: everything open (the default, unchanged)."""
    app = make_app(location=tmp_path / "open")
    try:
        c = app.test_client()
        assert c.get("/api/v1/images").status_code == 200
        assert c.delete(TAG_PATH.format("app", "v1")).status_code == 404
    finally:
        app.extensions["docket"].db.dispose()


def test_push_tokens_only_leave_reads_open(tmp_path, make_app):
    app = make_app(location=tmp_path / "p", auth_tokens=(PUSH_TOKEN,))
    try:
        c = app.test_client()
        assert c.get("/api/v1/images").status_code == 200
        assert c.delete(TAG_PATH.format("app", "v1")).status_code == 401
    finally:
        app.extensions["docket"].db.dispose()


def test_tokens_not_in_config_repr():
    config = RegistryConfig(auth_tokens=(PUSH_TOKEN,), read_tokens=(READ_TOKEN,))
    assert PUSH_TOKEN not in repr(config) and READ_TOKEN not in repr(config)


# -- the real server: cheroot's limits, HTTPS, startup errors ----------------------------------------------------

def registry_command() -> list[str]:
    """The registry program, advertising loopback: without the flag it would advertise this host's LAN address,
    and tests send traffic only to 127.0.0.0/8 (or to namespaces of their own)."""
    exe = shutil.which("docket-registry")
    return [*([exe] if exe else [sys.executable, "-m", "docket.registry"]), "--advertise-address", "127.0.0.1"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **extra}


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (SAN IP:127.0.0.1); returns (cert, key) PEM paths."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:  # pragma: no cover - openssl fallback
        cert, key = directory / "cert.pem", directory / "key.pem"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1", "-addext", "basicConstraints=critical,CA:TRUE"],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass
class TlsRegistry:
    proc: subprocess.Popen
    port: int
    url: str
    cert: Path
    location: Path
    log: Path

    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("verify", str(self.cert))
        kw.setdefault("timeout", 10)
        return requests.get(self.url + path, **kw)

    def state(self) -> dict:
        images = self.get("/api/v1/images", headers=AUTH).json()
        return {"images": images,
                **{d: sorted(p.name for p in (self.location / d).rglob("*") if p.is_file())
                   for d in ("blobs", "torrents", "uploads")}}


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory) -> Iterator[TlsRegistry]:
    """A real docket-registry over HTTPS with push and read tokens (tokens from a file and the env)."""
    work = tmp_path_factory.mktemp("tls-registry")
    cert, key = make_cert(work)
    tokens = work / "tokens"
    tokens.write_text(f"# push tokens\n{PUSH_TOKEN}\n\n")
    port = free_port()
    log = work / "registry.log"
    args = [*registry_command(), "--bind", "127.0.0.1", "--port", str(port), "--location", str(work / "loc"),
            "--no-seeding", "--gc-interval", "0", "--auth-token-file", str(tokens), "--log-level", "debug"]
    env = _env(DOCKET_TLS_CERT=str(cert), DOCKET_TLS_KEY=str(key), DOCKET_READ_TOKENS=f"{READ_TOKEN},other-read")
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    reg = TlsRegistry(proc, port, f"https://127.0.0.1:{port}", cert, work / "loc", log)
    try:
        wait_until(lambda: proc.poll() is not None or reg.get("/healthz").status_code in (200, 503), 30,
                   what="HTTPS registry to answer")
        assert proc.poll() is None, f"registry exited: {tail(log)}"
        yield reg
    finally:
        stop_process(proc)
        text = log.read_text(errors="replace")
        assert PUSH_TOKEN not in text and READ_TOKEN not in text, "a token was logged"


def test_https_registry_serves_and_is_verified(tls_registry):
    resp = tls_registry.get("/healthz")
    assert resp.status_code == 200 and resp.json()["status"] == "ok"
    with pytest.raises(requests.exceptions.SSLError):
        requests.get(tls_registry.url + "/healthz", timeout=10)  # default trust store: refused
    assert tls_registry.get("/api/v1/images").status_code == 401
    assert tls_registry.get("/api/v1/images", headers={"Authorization": f"Bearer {READ_TOKEN}"}).status_code == 200


def _raw_request(reg: TlsRegistry, request_bytes: bytes) -> tuple[int, bytes]:
    """Send raw bytes over TLS (requests refuses some of what we want to send); return (status, body)."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(reg.cert))
    with socket.create_connection(("127.0.0.1", reg.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(request_bytes)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


REAL_SERVER_CASES = {
    # id: (request bytes, acceptable statuses, whether the answer must be JSON)
    "oversized header (cheroot limit, 100 KiB)": (
        b"GET /api/v1/images HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Junk: " + b"j" * 100_000
        + b"\r\n\r\n", (413, 431), False),
    "oversized header (app limit, 32 KiB)": (
        b"GET /api/v1/images HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Junk: " + b"j" * 32_000
        + b"\r\n\r\n", (431,), True),
    "over-long request line (100 KiB URL)": (
        b"GET /api/v1/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", (414,), False),
    "malformed request line": (b"GET\r\n\r\n", (400,), False),
    "PUT with a bad token over HTTPS": (
        b"PUT /api/v1/repositories/app/tags/v1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer bad\r\n"
        b"Content-Type: application/x-tar\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello", (401,), True),
}


@pytest.mark.parametrize("case", list(REAL_SERVER_CASES))
def test_real_server_limits(tls_registry, case):
    request_bytes, statuses, must_be_json = REAL_SERVER_CASES[case]
    before = tls_registry.state()
    status, body = _raw_request(tls_registry, request_bytes)
    assert status in statuses, (status, body[:200])
    assert body, "an empty answer is not a clear error"
    if must_be_json:
        assert json.loads(body)["error"]["message"]
    assert tls_registry.get("/healthz").status_code == 200  # the server survived
    assert tls_registry.state() == before
    record("http (real server)", case, str(status), body[:160].decode(errors="replace"))


def _docket(*args: str, env: dict[str, str] | None = None) -> Any:
    base = {"DOCKET_TOKEN": None, "DOCKET_TOKEN_FILE": None, "DOCKET_CA_BUNDLE": None, "DOCKET_HOST": None}
    return CliRunner().invoke(cli, list(args), env={**base, **(env or {})}, catch_exceptions=False)


def test_client_https_without_ca_bundle_is_a_clear_error(tls_registry, tmp_path):
    before = tls_registry.state()
    result = _docket("-h", tls_registry.url, "-l", str(tmp_path), "images", env={"DOCKET_TOKEN": READ_TOKEN})
    assert result.exit_code == 8, result.output
    assert f"127.0.0.1:{tls_registry.port}" in result.output and "certificate" in result.output
    assert "--ca-bundle" in result.output and "Traceback" not in result.output
    assert tls_registry.state() == before
    record("client", "https registry, CA not trusted", f"exit {result.exit_code}", result.output.strip())


def test_client_http_scheme_against_https_is_a_clear_error(tls_registry, tmp_path):
    result = _docket("-h", f"http://127.0.0.1:{tls_registry.port}", "-l", str(tmp_path), "images",
                     env={"DOCKET_TOKEN": READ_TOKEN})
    assert result.exit_code == 8, result.output
    assert "Traceback" not in result.output and "127.0.0.1" in result.output and "https://" in result.output
    record("client", "http:// against an https registry", f"exit {result.exit_code}", result.output.strip())


def test_client_https_against_http_is_a_clear_error(tmp_path):
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = _docket("-h", f"https://127.0.0.1:{server.server_address[1]}", "-l", str(tmp_path), "images")
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 8, result.output
    assert "does not seem to speak HTTPS" in result.output and "http://" in result.output
    assert "Traceback" not in result.output
    record("client", "https:// against a plain-HTTP server", f"exit {result.exit_code}", result.output.strip())


def test_client_without_token_gets_hint(tls_registry, tmp_path):
    result = _docket("-h", tls_registry.url, "-l", str(tmp_path), "images",
                     env={"DOCKET_CA_BUNDLE": str(tls_registry.cert)})
    assert result.exit_code == 5, result.output
    assert "missing" in result.output and "DOCKET_TOKEN" in result.output
    record("client", "no token, registry requires one", f"exit {result.exit_code}", result.output.strip())


def test_client_wrong_token_gets_hint(tls_registry, tmp_path):
    result = _docket("-h", tls_registry.url, "-l", str(tmp_path), "--ca-bundle", str(tls_registry.cert),
                     "images", env={"DOCKET_TOKEN": "not-the-token"})
    assert result.exit_code == 5, result.output
    assert "invalid" in result.output and "DOCKET_TOKEN" in result.output
    assert "not-the-token" not in result.output
    record("client", "wrong token", f"exit {result.exit_code}", result.output.strip())


def test_client_token_file_and_ca_bundle_work(tls_registry, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(f"# comment\n{READ_TOKEN}\n")
    result = _docket("-h", tls_registry.url, "-l", str(tmp_path), "images", "--json",
                     env={"DOCKET_TOKEN_FILE": str(token_file), "DOCKET_CA_BUNDLE": str(tls_registry.cert)})
    assert result.exit_code == 0, result.output
    assert isinstance(json.loads(result.stdout), list)


CLIENT_USAGE = {
    "--ca-bundle that does not exist": (["--ca-bundle", "/nonexistent/ca.pem"], "ca-bundle"),
    "--token-file that does not exist": (["--token-file", "/nonexistent/token"], "token-file"),
    "--token-file with only comments": (["--token-file", "COMMENTS"], "no token"),
    "token with a space": (["--token", "two words"], "spaces"),
}


@pytest.mark.parametrize("case", list(CLIENT_USAGE))
def test_client_bad_options(tmp_path, case):
    args, word = CLIENT_USAGE[case]
    comments = tmp_path / "comments"
    comments.write_text("# nothing\n\n")
    args = [str(comments) if a == "COMMENTS" else a for a in args]
    result = _docket("-h", "http://127.0.0.1:9", "-l", str(tmp_path), *args, "images")
    assert result.exit_code == 2, result.output
    assert word in result.output.lower() and "Traceback" not in result.output
    record("client", case, f"exit {result.exit_code}", result.output.strip())


def test_client_push_image_not_present_locally(docker_host, tls_registry, tmp_path):
    before = tls_registry.state()
    result = _docket("-h", tls_registry.url, "-l", str(tmp_path), "--ca-bundle", str(tls_registry.cert),
                     "push", "docket-test/not-here-at-all:v9", env={"DOCKET_TOKEN": PUSH_TOKEN})
    assert result.exit_code == 4, result.output
    assert "not found in the local Docker daemon" in result.output
    assert tls_registry.state() == before
    record("client", "push of an image not present locally", f"exit {result.exit_code}", result.output.strip())


def test_client_push_over_https_with_ca_bundle(image_factory, tls_registry, tmp_path):
    ref, _ = image_factory.build(data_mib=0.5)
    common = ["-h", tls_registry.url, "-l", str(tmp_path)]
    before = tls_registry.state()
    failed = _docket(*common, "push", ref, env={"DOCKET_TOKEN": PUSH_TOKEN})
    assert failed.exit_code == 8 and "--ca-bundle" in failed.output, failed.output
    read_only = _docket(*common, "--ca-bundle", str(tls_registry.cert), "push", ref,
                        env={"DOCKET_TOKEN": READ_TOKEN})
    assert read_only.exit_code == 5 and "only read" in read_only.output, read_only.output
    assert tls_registry.state() == before
    ok = _docket(*common, "--ca-bundle", str(tls_registry.cert), "push", ref, env={"DOCKET_TOKEN": PUSH_TOKEN})
    assert ok.exit_code == 0, ok.output
    assert f"Successfully pushed {ref}" in ok.output
    listed = tls_registry.get("/api/v1/images", headers={"Authorization": f"Bearer {READ_TOKEN}"}).json()
    assert ref in [i["ref"] for i in listed["images"]]


STARTUP_ERRORS = {
    "--tls-cert without --tls-key": (["--tls-cert", "CERT"], "go together"),
    "unreadable --tls-cert": (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "KEY"], "cannot read --tls-cert"),
    "key that does not match": (["--tls-cert", "CERT", "--tls-key", "OTHERKEY"], "cannot use"),
    "certificate that is not PEM": (["--tls-cert", "GARBAGE", "--tls-key", "KEY"], "cannot use"),
    "missing token file": (["--auth-token-file", "/nonexistent/tokens"], "cannot read token file"),
    "empty token file": (["--auth-token-file", "EMPTY"], "holds no token"),
    "read tokens without push tokens": (["--read-token", READ_TOKEN], "no push token"),
}


@pytest.mark.parametrize("case", list(STARTUP_ERRORS))
def test_registry_startup_errors(tmp_path, case):
    args, words = STARTUP_ERRORS[case]
    cert, key = make_cert(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = make_cert(other)
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    (tmp_path / "empty").write_text("# none yet\n")
    subst = {"CERT": str(cert), "KEY": str(key), "OTHERKEY": str(other_key), "GARBAGE": str(tmp_path / "garbage.pem"),
             "EMPTY": str(tmp_path / "empty")}
    args = [subst.get(a, a) for a in args]
    proc = subprocess.run([*registry_command(), "--bind", "127.0.0.1", "--port", str(free_port()), "--location",
                           str(tmp_path / "loc"), "--no-seeding", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60, env=_env())
    assert proc.returncode != 0, proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    record("registry startup", case, f"exit {proc.returncode}", proc.stderr.strip().splitlines()[0])
