"""A real `docket agent` process in front of a hostile or broken registry: a small HTTP server on a free loopback
port that lies about digests, sends oversized manifests, omits sizes, hangs, or asks for credentials. The agent
must refuse what does not match (and cache none of it), stay bounded, answer quickly, and pass the registry's
authentication dance and the client's credentials through unchanged."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from tests.support.agent import AgentProcess
from tests.support.fakes import QuietHTTPServer, serving
from tests.support.procs import free_port, tail

MiB = 1024 * 1024
MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
GOOD = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": []}).encode()
LIE = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "layers": [], "evil": True}).encode()
CHALLENGE = 'Bearer realm="http://127.0.0.1:1/token",service="docket",scope="repository:private/app:pull"'
DENIED = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "authentication required",
                                 "detail": [{"Type": "repository", "Name": "private/app", "Action": "pull"}]}]}).encode()
HUGE = 64 * MiB  # the manifest the registry tries to send (the agent reads at most 4 MiB of it)
BLOB = bytes(range(256)) * 1024  # 256 KiB, served over HTTP (no torrent)
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
BAD_BLOB_DIGEST = "sha256:" + hashlib.sha256(b"what the name promises").hexdigest()  # served as BLOB's bytes


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class HostileRegistry:
    """Records every request (method, path, Authorization) and answers from ``routes``."""

    seen: list[tuple[str, str, str | None]] = field(default_factory=list)
    huge_sent: int = 0
    blob_delay: float = 0.0  # seconds before the bytes of a blob are sent
    ping_401: bool = False  # /v2/ asks for credentials (docker's first request: the challenge it learns from)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def auth_of(self, path: str) -> list[str | None]:
        return [a for m, p, a in self.seen if p.split("?")[0] == path]

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        reg = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
                        length: bool = True) -> None:
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                if length:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                reg.seen.append((self.command, self.path, self.headers.get("Authorization")))
                if path == "/v2/" and reg.ping_401:
                    return self._answer(401, DENIED, {"Content-Type": "application/json",
                                                      "WWW-Authenticate": CHALLENGE})
                if path == "/v2/":
                    return self._answer(200, b"{}", {"Content-Type": "application/json"})
                if path == "/v2/app/manifests/good":
                    return self._answer(200, GOOD, {"Content-Type": MANIFEST_TYPE,
                                                    "Docker-Content-Digest": sha256(GOOD)})
                if path == "/v2/app/manifests/lie":  # the body is not the one its digest header names
                    return self._answer(200, LIE, {"Content-Type": MANIFEST_TYPE,
                                                   "Docker-Content-Digest": sha256(GOOD)})
                if path == f"/v2/app/manifests/{sha256(GOOD)}":  # by digest, with other bytes (and no header)
                    return self._answer(200, LIE, {"Content-Type": MANIFEST_TYPE})
                if path == "/v2/app/manifests/huge":
                    return self._huge()
                if path.startswith("/v2/private/"):
                    return self._answer(401, DENIED, {"Content-Type": "application/json",
                                                      "WWW-Authenticate": CHALLENGE})
                if path == "/v2/app/tags/list":
                    return self._answer(200, json.dumps({"name": "app", "tags": ["good"]}).encode(),
                                        {"Content-Type": "application/json"})
                if path == f"/v2/app/blobs/{BLOB_DIGEST}" or path == f"/v2/app/blobs/{BAD_BLOB_DIGEST}":
                    return self._answer(200, BLOB, {"Content-Type": "application/octet-stream"})
                if path in (f"/v2/app/blobs/sha256:{'6' * 64}", f"/v2/app/blobs/sha256:{'7' * 64}"):
                    size = "-1" if "6666" in path else str(10 ** 18)  # a size no blob has
                    self.send_response(200)
                    self.send_header("Content-Length", size)
                    self.end_headers()
                    return None
                if path.startswith("/v2/app/blobs/sha256:"):  # a HEAD without a size
                    return self._answer(200, b"", {"Content-Type": "application/octet-stream"}, length=False)
                if path.startswith("/api/v1/blobs/") and path.endswith("/torrent"):
                    return self._answer(404, b'{"errors":[]}', {"Content-Type": "application/json"})
                if path in (f"/api/v1/blobs/{BLOB_DIGEST}", f"/api/v1/blobs/{BAD_BLOB_DIGEST}"):
                    time.sleep(reg.blob_delay)
                    return self._answer(200, BLOB, {"Content-Type": "application/octet-stream"})
                return self._answer(404, b'{"errors":[{"code":"NOT_FOUND"}]}', {"Content-Type": "application/json"})

            def _huge(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", MANIFEST_TYPE)
                self.send_header("Content-Length", str(HUGE))
                self.end_headers()
                chunk = b" " * (256 * 1024)
                with contextlib.suppress(OSError):
                    while reg.huge_sent < HUGE:
                        self.wfile.write(chunk)
                        reg.huge_sent += len(chunk)

        return Handler


@pytest.fixture
def hostile() -> Iterator[HostileRegistry]:
    reg = HostileRegistry()
    with serving(QuietHTTPServer(("127.0.0.1", 0), reg.handler())) as reg.port:
        yield reg


@contextlib.contextmanager
def silent_registry() -> Iterator[str]:
    """Accepts connections and never answers (reads what is sent, holds the socket until the end)."""
    sock = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    conns: list[socket.socket] = []

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conns.append(sock.accept()[0])

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        stop.set()
        t.join(5)
        for c in conns:
            c.close()
        sock.close()


def _agent(tmp_path: Path, url: str, name: str = "a", env: dict[str, str] | None = None,
           extra: list[str] | None = None) -> AgentProcess:
    return AgentProcess(url, tmp_path / f"agent-{name}", free_port(), tmp_path / f"agent-{name}.log",
                        env=env or {}, extra_args=extra or [])


def _error(resp: requests.Response) -> dict:
    return resp.json()["errors"][0]


def _kept_manifests(agent: AgentProcess) -> list[str]:
    root = agent.cache_dir / "manifests"
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024


def test_manifests_that_do_not_match_their_digest_are_refused_and_not_cached(hostile, tmp_path: Path):
    with _agent(tmp_path, hostile.url) as a:
        accept = {"Accept": MANIFEST_TYPE}
        lie = requests.get(f"{a.url}/v2/app/manifests/lie", headers=accept, timeout=30)
        assert lie.status_code == 502, (lie.status_code, lie.text)
        assert _error(lie)["code"] == "DIGEST_INVALID" and LIE not in lie.content
        by_digest = requests.get(f"{a.url}/v2/app/manifests/{sha256(GOOD)}", headers=accept, timeout=30)
        assert by_digest.status_code == 502 and _error(by_digest)["code"] == "DIGEST_INVALID", by_digest.text
        head = requests.head(f"{a.url}/v2/app/manifests/{sha256(GOOD)}", headers=accept, timeout=30)
        assert head.status_code == 502  # a HEAD by digest checks the bytes too
        assert _kept_manifests(a) == []  # nothing the registry lied about was kept
        assert a.status()["totals"]["manifests_fetched"] == 0
        assert "does not match" in lie.text or "DIGEST_INVALID" in lie.text

        good = requests.get(f"{a.url}/v2/app/manifests/good", headers=accept, timeout=30)  # the control
        assert good.status_code == 200 and good.content == GOOD
        assert good.headers["Docker-Content-Digest"] == sha256(GOOD)
        assert _kept_manifests(a) == sorted([sha256(GOOD)[7:], sha256(GOOD)[7:] + ".type"])
        # the kept (verified) copy answers by digest now, not the registry's lying by-digest body
        again = requests.get(f"{a.url}/v2/app/manifests/{sha256(GOOD)}", headers=accept, timeout=30)
        assert again.status_code == 200 and again.content == GOOD
        assert "manifest sha256:" in a.log.read_text() and "refused" in a.log.read_text()


def test_an_oversized_manifest_is_refused_with_bounded_memory(hostile, tmp_path: Path):
    with _agent(tmp_path, hostile.url) as a:
        assert a.proc is not None
        requests.get(f"{a.url}/v2/app/manifests/good", timeout=30)  # warm: the code paths are loaded
        before = _peak_rss(a.proc.pid)
        t0 = time.monotonic()
        got = requests.get(f"{a.url}/v2/app/manifests/huge", timeout=60)
        took = time.monotonic() - t0
        assert 500 <= got.status_code < 600, (got.status_code, got.text[:300])
        assert "larger than" in _error(got)["message"]
        grew = _peak_rss(a.proc.pid) - before
        assert grew < 24 * MiB, f"the agent's peak RSS grew {grew / MiB:.1f} MiB for a {HUGE // MiB} MiB manifest"
        assert hostile.huge_sent < HUGE // 2, hostile.huge_sent  # it stopped reading (the socket was closed)
        assert took < 10, took
        assert _kept_manifests(a) == [sha256(GOOD)[7:], sha256(GOOD)[7:] + ".type"]
        assert requests.get(f"{a.url}/healthz", timeout=10).json()["ok"] is True


def test_a_blob_without_a_size_or_with_wrong_bytes_is_never_served(hostile, tmp_path: Path):
    with _agent(tmp_path, hostile.url, extra=["--cache-size", "1MiB"]) as a:
        # the control: a blob without a torrent comes over HTTP and is served whole
        ok = requests.get(f"{a.url}/v2/app/blobs/{BLOB_DIGEST}", timeout=60)
        assert ok.status_code == 200 and ok.content == BLOB, ok.text[:300]
        assert a.outcome(BLOB_DIGEST)["via"] == "http"
        held = a.cache_dir / "blobs" / BLOB_DIGEST[7:]
        assert held.exists()
        nosize = f"sha256:{'5' * 64}"
        for method in ("HEAD", "GET"):
            got = requests.request(method, f"{a.url}/v2/app/blobs/{nosize}", timeout=30)
            assert got.status_code == 502, (method, got.status_code, got.text)
        negative, exabyte = f"sha256:{'6' * 64}", f"sha256:{'7' * 64}"
        got = requests.get(f"{a.url}/v2/app/blobs/{negative}", timeout=30)
        assert got.status_code == 502 and "no valid size" in _error(got)["message"], (got.status_code, got.text)
        assert not [b for b in a.status()["blobs"] if b["digest"] == negative]  # no download was tried
        got = requests.get(f"{a.url}/v2/app/blobs/{exabyte}", timeout=30)
        assert 500 <= got.status_code < 600 and "disk space" in _error(got)["message"], (got.status_code, got.text)
        assert held.exists(), "a size no disk holds emptied the cache before failing"
        assert "evicted" not in a.log.read_text()
        # the registry's bytes do not hash to the digest asked for: 502, the file deleted, nothing marked
        bad = requests.get(f"{a.url}/v2/app/blobs/{BAD_BLOB_DIGEST}", timeout=60)
        assert bad.status_code == 502 and BLOB not in bad.content, (bad.status_code, bad.text[:300])
        assert a.outcome(BAD_BLOB_DIGEST)["via"] == "failed"
        hexd = BAD_BLOB_DIGEST[7:]
        assert not (a.cache_dir / "blobs" / hexd).exists()
        assert not (a.cache_dir / "torrents" / hexd / "verified").exists()
        again = requests.get(f"{a.url}/v2/app/blobs/{BLOB_DIGEST}", timeout=60)  # still held: no new download
        assert again.content == BLOB and [b["digest"] for b in a.status()["blobs"]].count(BLOB_DIGEST) == 1


def test_a_registry_that_never_answers_is_a_503_at_the_read_deadline(tmp_path: Path):
    """The ping and every blob read (a HEAD first) answer 503 at the agent's HEAD deadline (10 s); the GETs of
    documents (manifest by tag, tag list) at its read deadline (30 s). Measured: 10.0 s and 30.0 s."""
    with silent_registry() as url, _agent(tmp_path, url) as a:
        limits = {"/v2/": 12, f"/v2/app/blobs/sha256:{'2' * 64}": 12, f"/v2/app/manifests/sha256:{'3' * 64}": 35,
                  "/v2/app/manifests/v1": 35, "/v2/app/tags/list": 35}
        took: dict[str, float] = {}
        got: dict[str, requests.Response] = {}

        def one(path: str) -> None:
            t0 = time.monotonic()
            got[path] = requests.request("HEAD" if "/blobs/" in path else "GET", a.url + path, timeout=90)
            got[path + " GET"] = requests.get(a.url + path, timeout=90) if "/blobs/" in path else got[path]
            took[path] = time.monotonic() - t0

        threads = [threading.Thread(target=one, args=(p,), daemon=True) for p in limits]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert set(took) == set(limits), tail(a.log)
        for path, limit in limits.items():
            for resp in (got[path], got[path + " GET"]):
                assert resp.status_code == 503, (path, resp.status_code, resp.text)
                if resp.request.method != "HEAD":
                    assert _error(resp)["code"] == "UNAVAILABLE" and url in _error(resp)["message"], resp.text
            calls = 2 if "/blobs/" in path else 1  # the blob's HEAD and GET, one after the other
            assert took[path] < limit * calls, (path, took[path])
        print(f"\nsilent registry: 503 after {', '.join(f'{p} {s:.1f} s' for p, s in took.items())}")


def test_a_401_and_its_challenge_reach_the_client_unchanged(hostile, tmp_path: Path):
    with _agent(tmp_path, hostile.url) as a:
        for method, path in (("GET", "/v2/private/app/manifests/v1"), ("HEAD", "/v2/private/app/manifests/v1"),
                             ("GET", "/v2/private/app/tags/list"), ("GET", f"/v2/private/app/blobs/{BLOB_DIGEST}"),
                             ("HEAD", f"/v2/private/app/blobs/{BLOB_DIGEST}")):
            got = requests.request(method, a.url + path, timeout=30)
            assert got.status_code == 401, (method, path, got.status_code, got.text)
            assert got.headers.get("WWW-Authenticate") == CHALLENGE, (method, path, got.headers)
            if method == "GET" and "/blobs/" not in path:  # the registry's body as it was
                assert got.content == DENIED, (path, got.content)
            elif method == "GET":  # the blob's HEAD had no body: the agent's own, same code
                assert _error(got)["code"] == "UNAUTHORIZED"
        assert not (a.cache_dir / "blobs" / BLOB_DIGEST[7:]).exists()
        hostile.ping_401 = True
        ping = requests.get(f"{a.url}/v2/", timeout=30)
        assert ping.status_code == 401 and ping.headers.get("WWW-Authenticate") == CHALLENGE
        assert ping.content == DENIED and ping.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_the_clients_authorization_is_forwarded_and_the_agents_token_used_without_one(hostile, tmp_path: Path):
    with _agent(tmp_path, hostile.url, env={"DOCKET_TOKEN": "agent-secret"}) as a:
        mine = {"Authorization": "Bearer client-token"}
        assert requests.get(f"{a.url}/v2/app/tags/list", headers=mine, timeout=30).status_code == 200
        assert hostile.auth_of("/v2/app/tags/list") == ["Bearer client-token"]  # as it came, not the agent's
        assert requests.get(f"{a.url}/v2/app/manifests/good", timeout=30).status_code == 200
        assert hostile.auth_of("/v2/app/manifests/good") == ["Bearer agent-secret"]
        # a blob fetch: the HEAD, the torrent and the bytes all carry the client's credentials
        got = requests.get(f"{a.url}/v2/app/blobs/{BLOB_DIGEST}", headers=mine, timeout=60)
        assert got.status_code == 200 and got.content == BLOB
        for path in (f"/v2/app/blobs/{BLOB_DIGEST}", f"/api/v1/blobs/{BLOB_DIGEST}/torrent",
                     f"/api/v1/blobs/{BLOB_DIGEST}"):
            assert hostile.auth_of(path) and set(hostile.auth_of(path)) == {"Bearer client-token"}, \
                (path, hostile.seen)
        assert "agent-secret" not in a.log.read_text()  # never logged


def test_many_clients_asking_for_one_blob_share_one_download(hostile, tmp_path: Path):
    """Eight local clients GET the same blob at once (the registry takes a second to answer): one download from
    the registry, eight whole answers; then a Range read of the held blob."""
    hostile.blob_delay = 1.0
    with _agent(tmp_path, hostile.url) as a:
        got: list[requests.Response] = []
        start = threading.Barrier(8)

        def one() -> None:
            start.wait()
            got.append(requests.get(f"{a.url}/v2/app/blobs/{BLOB_DIGEST}", timeout=60))

        threads = [threading.Thread(target=one, daemon=True) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(got) == 8 and all(r.status_code == 200 and r.content == BLOB for r in got), \
            [(r.status_code, len(r.content)) for r in got]
        assert hostile.auth_of(f"/api/v1/blobs/{BLOB_DIGEST}") == [None]  # the bytes were fetched once
        outcomes = [b for b in a.status()["blobs"] if b["digest"] == BLOB_DIGEST]
        assert len(outcomes) == 1 and outcomes[0]["clients"] == 8, outcomes
        assert a.status()["totals"]["blobs_served"] == 8
        part = requests.get(f"{a.url}/v2/app/blobs/{BLOB_DIGEST}", headers={"Range": "bytes=1000-1999"}, timeout=30)
        assert part.status_code == 206 and part.content == BLOB[1000:2000]
        assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(BLOB)}"
