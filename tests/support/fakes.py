"""Fakes shared by the client tests: registries on a real loopback HTTP server (``Canned``: answers set per route;
``FakeRegistry``: the layer endpoints in memory), scripted ctorrent stand-ins (``FakeCtorrent`` for whole blobs,
``FakeTorrentProc`` for layers), a Docker stand-in, and the pullers wired to them. The fixtures serving them are in
tests/client/conftest.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from docket.client.api import RegistryClient
from docket.client.pull import Puller, PullOptions
from docket.reference import Reference
from docket.torrent.ctorrent_engine import CtorrentEngine

REF = Reference("team/app", "v1")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    """A layer tarball (USTAR) holding ``files``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


# -- a tiny real HTTP server serving canned answers ---------------------------------------------------------

class QuietHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that stops mid-body (the export-failure test) is expected


@contextlib.contextmanager
def serving(server: http.server.HTTPServer) -> Iterator[int]:
    """Serve on a daemon thread for the block; yields the port. The server is shut down and closed after it."""
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Canned:
    routes: dict[tuple[str, str], tuple[int, dict[str, str], bytes]] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def json(self, method: str, path: str, status: int, body: Any) -> None:
        self.routes[(method, path)] = (status, {"Content-Type": "application/json"}, json.dumps(body).encode())

    def raw(self, method: str, path: str, status: int, body: bytes, ctype: str = "application/octet-stream") -> None:
        self.routes[(method, path)] = (status, {"Content-Type": ctype}, body)


class FakeHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1, quiet, and a request body read whole (Content-Length or chunked): what the fake servers share."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""


def canned_handler(canned: Canned) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(FakeHandler):
        def _serve(self) -> None:
            body = self._body() if self.command in ("PUT", "POST") else b""
            canned.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                    "body": body})
            status, headers, payload = canned.routes.get(
                (self.command, self.path),
                (404, {"Content-Type": "application/json"},
                 json.dumps({"error": {"code": "NOT_FOUND", "message": f"no route {self.path}", "hint": None}})
                 .encode()))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _serve

    return Handler


def make_record(canned: Canned, data: bytes, info_hash: str, ref: str = "team/app:v1") -> dict[str, Any]:
    """A one-layer image whose layer is ``data`` (its config served by ``canned``). The record's "digest" is the
    layer's: the client only checks its form, and the tests name the blob by it."""
    repo, tag = ref.split(":")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
    image_id = "sha256:" + hashlib.sha256(config).hexdigest()
    canned.raw("GET", f"/api/v1/blobs/{image_id}", 200, config)
    return {"repository": repo, "tag": tag, "ref": ref, "format": "layers", "image_id": image_id,
            "created": "2026-01-01T00:00:00Z", "size": len(data), "digest": digest,
            "config": {"digest": image_id, "size": len(config)},
            "layers": [{"digest": digest, "size": len(data), "info_hash": info_hash}]}


# -- a fake registry: HEAD/GET/POST blobs, PUT manifests ------------------------------------------------------

class FakeRegistry:
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.kinds: dict[str, str] = {}
        self.posts: list[dict[str, Any]] = []
        self.manifests: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, bytes] = {}  # GET path -> body (records, torrents)
        self.port = 0

    def handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        reg = self

        class H(FakeHandler):
            def _send(self, status: int, body: bytes = b"", length: int | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _err(self, status: int, code: str, msg: str) -> None:
                self._send(status, json.dumps({"error": {"code": code, "message": msg, "hint": None}}).encode())

            def do_HEAD(self) -> None:
                digest = self.path.rsplit("/", 1)[1]
                if digest in reg.blobs:
                    self._send(200, length=len(reg.blobs[digest]))
                else:
                    self._send(404, length=0)

            def do_GET(self) -> None:
                if self.path in reg.extra:
                    return self._send(200, reg.extra[self.path])
                digest = self.path.rsplit("/", 1)[1]
                if digest in reg.blobs:
                    self._send(200, reg.blobs[digest])
                else:
                    self._err(404, "NOT_FOUND", "no blob")

            def do_POST(self) -> None:
                url = urlsplit(self.path)
                q = parse_qs(url.query)
                body = self._body()
                digest = sha(body)
                reg.posts.append({"kind": q["kind"][0], "digest": digest, "size": len(body),
                                  "given": q.get("digest", [None])[0]})
                if q.get("digest") and q["digest"][0] != digest:
                    return self._err(400, "DIGEST_MISMATCH", "digest mismatch")
                existed = digest in reg.blobs
                reg.blobs[digest] = body
                reg.kinds[digest] = q["kind"][0]
                self._send(200 if existed else 201, json.dumps(
                    {"digest": digest, "size": len(body), "kind": q["kind"][0], "info_hash": None}).encode())

            def do_PUT(self) -> None:
                body = self._body()
                if not body:
                    return self._err(400, "INVALID_REQUEST", "empty")
                m = json.loads(body)
                for d in [m["config"], *m["layers"]]:
                    if d not in reg.blobs:
                        return self._err(404, "NOT_FOUND", f"blob {d} unknown")
                cfg = json.loads(reg.blobs[m["config"]])
                if cfg["rootfs"]["diff_ids"] != m["layers"]:
                    return self._err(400, "INVALID_IMAGE", "diff_ids differ")
                canon = json.dumps({"config": m["config"], "layers": m["layers"]}, separators=(",", ":"),
                                   sort_keys=True)
                rec = {"digest": sha(canon.encode()), "image_id": m["config"], "format": "layers"}
                reg.manifests[self.path] = rec
                self._send(201, json.dumps(rec).encode())

        return H


# -- a scripted ctorrent (whole blobs) and the puller using it ------------------------------------------------

@dataclass
class FakeStatus:
    have: int
    total: int
    down_kbps: float = 100.0
    leechers: int = 1  # a downloading peer is connected unless a test says otherwise


class FakeCtorrent:
    """Behaves like CtorrentProcess: writes ``data`` piece by piece (or stalls, or dies)."""

    instances: list[FakeCtorrent] = []
    leechers_after_completion = 1

    def __init__(self, data: bytes, piece: int, mode: str = "ok", **kw: Any) -> None:
        self.kw = kw
        self.data, self.piece, self.mode = data, piece, mode
        self.completed = threading.Event()
        self.status: FakeStatus | None = None
        self._alive = False
        self.stopped = False
        FakeCtorrent.instances.append(self)

    def start(self) -> None:
        self._alive = True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        total = -(-len(self.data) // self.piece)
        if self.mode == "stall":
            self.status = FakeStatus(0, total)
            return
        if self.mode == "die":
            self.status = FakeStatus(1, total)
            time.sleep(0.2)
            self._alive = False
            return
        out = self.kw["save_as"]
        payload = self.data if self.mode == "ok" else b"\0" * len(self.data)
        out.write_bytes(payload)
        for have in range(total + 1):
            self.status = FakeStatus(have, total)
            time.sleep(0.01)
        self.status = FakeStatus(total, total, leechers=FakeCtorrent.leechers_after_completion)
        self.completed.set()

    def alive(self) -> bool:
        return self._alive and not self.stopped

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True

    def tail(self, n: int = 20) -> list[str]:
        return ["Listening on 127.1.2.3:2706", "tracker said no"]


def make_puller(canned: Canned, tmp_path: Path, data: bytes, mode: str = "ok", scrapes=None, handoff: Any = None,
                **opts: Any) -> Puller:
    piece = 256 * 1024

    def factory(**kw: Any) -> FakeCtorrent:
        return FakeCtorrent(data, piece, mode, **kw)

    scrape_iter = iter(scrapes or [])

    def scraper(url: str, ih: str) -> Any:
        return next(scrape_iter)

    options = PullOptions(location=tmp_path / "loc", poll_interval=0.02, scrape_interval=0.05, **opts)
    return Puller(RegistryClient("127.0.0.1", canned.port), None, options,
                  engine=CtorrentEngine(process_factory=factory), scraper=scraper, handoff=handoff)


# -- layer pulls: a scripted ctorrent per layer, a Docker stand-in, the puller using them -------------------------

class FakeTorrentProc:
    """Writes the layer's bytes (looked up by the blob's file name) and reports completion."""

    instances: list[FakeTorrentProc] = []

    def __init__(self, by_hex: dict[str, bytes], **kw: Any) -> None:
        self.kw = kw
        self.data = by_hex[Path(kw["save_as"]).name]
        self.completed = threading.Event()
        self.status = None
        self.completed_at = None
        self._alive = False
        FakeTorrentProc.instances.append(self)

    def start(self) -> None:
        self._alive = True
        Path(self.kw["save_as"]).write_bytes(self.data)
        self.completed.set()

    def alive(self) -> bool:
        return self._alive

    def stop(self, timeout: float = 5.0) -> None:
        self._alive = False

    def tail(self, n: int = 20) -> list[str]:
        return []


class FakeDocker:
    def __init__(self, chain: set[str]) -> None:
        self.chain = chain
        self.loaded: bytes = b""

    def ping(self) -> None:
        pass

    def local_chain_ids(self) -> set[str]:
        return self.chain

    def load_stream(self, chunks, ref, expected_id) -> str:
        self.loaded = b"".join(chunks)
        return expected_id


def layer_puller(reg: FakeRegistry, tmp_path: Path, by_hex: dict[str, bytes], docker: Any = None, **opts: Any):
    options = PullOptions(location=tmp_path / "loc", poll_interval=0.02, scrape_interval=0.05, **opts)
    return Puller(RegistryClient("127.0.0.1", reg.port), docker, options,
                  engine=CtorrentEngine(process_factory=lambda **kw: FakeTorrentProc(by_hex, **kw)),
                  scraper=lambda url, ih: type("S", (), {"incomplete": 0, "complete": 1})())


class FakeSeed:
    """A seeding transfer of ``FakeSeedEngine``: ``exited = True`` makes it die by itself (as a crashed ctorrent)."""

    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.pid = 4242
        self.listen_port = kw.get("port")
        self.status = None
        self.completed = threading.Event()
        self.completed.set()
        self.stopped = False
        self.exited = False

    def alive(self) -> bool:
        return not (self.stopped or self.exited)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopped = True


class FakeSeedEngine:
    """The seed half of an engine, recording every seed (the background seeder's and the agent's tests)."""

    def __init__(self) -> None:
        self.seeds: list[FakeSeed] = []

    def seed(self, torrent: Path, blob: Path, **kw: Any) -> FakeSeed:
        seed = FakeSeed(torrent=torrent, blob=blob, **kw)
        self.seeds.append(seed)
        return seed

    def stop_all(self, transfers: Any, timeout: float) -> None:
        for t in transfers:
            t.stop()
