"""benchmarks/v2pull.py against a real HTTP server on loopback: dockerd's order, at most three layers at a time,
every blob checked against its digest (a corrupt blob is retried, then the pull fails)."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("docket_bench_v2pull", ROOT / "benchmarks" / "v2pull.py")
assert spec and spec.loader
v2pull = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = v2pull
spec.loader.exec_module(v2pull)


def _digest(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Registry:
    """A minimal /v2 server: one image, blobs served slowly enough to see the concurrency; optional corruption."""

    def __init__(self, layers: int, corrupt: int | None = None) -> None:
        self.config = json.dumps({"os": "linux"}).encode()
        self.layers = [os.urandom(64 * 1024 + k) for k in range(layers)]
        self.blobs = {_digest(b): b for b in [self.config, *self.layers]}
        self.corrupt = _digest(self.layers[corrupt]) if corrupt is not None else None
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": len(self.config),
                       "digest": _digest(self.config)},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": len(b),
                        "digest": _digest(b)} for b in self.layers]}).encode()
        self.log: list[tuple[str, str, float]] = []  # (event, path, time)
        self.active = self.peak = 0
        self.lock = threading.Lock()
        self.accept: list[str] = []
        reg = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                if "/manifests/" in self.path:
                    reg.accept.append(self.headers.get("Accept", ""))
                    body, ctype = reg.manifest, "application/vnd.docker.distribution.manifest.v2+json"
                else:
                    digest = self.path.rsplit("/", 1)[1]
                    body, ctype = reg.blobs.get(digest, b""), "application/octet-stream"
                    if digest == reg.corrupt:
                        body = b"x" + body[1:]
                with reg.lock:
                    reg.active += 1
                    reg.peak = max(reg.peak, reg.active)
                    reg.log.append(("start", self.path, time.monotonic()))
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    if "/manifests/" in self.path:
                        self.send_header("Docker-Content-Digest", _digest(body))
                    self.end_headers()
                    time.sleep(0.1)
                finally:
                    # counted out before the body goes: once the client has it, it may start its next request at
                    # once, before this thread would get back from write() (a 4th "at once" that was not)
                    with reg.lock:
                        reg.active -= 1
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Registry:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_pulls_in_dockerds_order_three_layers_at_a_time() -> None:
    with Registry(layers=7) as reg:
        res = v2pull.V2Puller(reg.base).pull("bench/x", "v1")
    assert res.ok, res.error
    paths = [p for _, p, _ in reg.log]
    assert paths[0] == "/v2/bench/x/manifests/v1" and paths[1].endswith(_digest(reg.config))
    assert "application/vnd.oci.image.manifest.v1+json" in reg.accept[0]
    assert reg.peak == 3  # seven layers, never more than three at once
    assert res.bytes == sum(len(b) for b in reg.blobs.values()) and res.retries == 0
    assert [b[0] for b in res.blobs] == [_digest(reg.config), *(_digest(b) for b in reg.layers)]
    assert 0 < res.manifest_s <= res.config_s <= res.seconds


def test_a_corrupt_layer_is_retried_then_fails_the_pull() -> None:
    with Registry(layers=2, corrupt=1) as reg:
        res = v2pull.V2Puller(reg.base, attempts=2).pull("bench/x", "v1")
        tries = sum(1 for _, p, _ in reg.log if p.endswith(reg.corrupt))
    assert not res.ok and reg.corrupt in res.error and "2 attempts" in res.error
    assert tries == 2
