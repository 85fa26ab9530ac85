"""Slow and idle clients against a real docket-registry: half-open request heads, trickled bodies, silent TLS.

Before docket/registry/server.py, as many such connections as ``--threads`` stopped the registry (each held a
worker thread for 60 s per read) and one silent TCP connection to an HTTPS registry stopped it accepting at all.
Figures at scale (200 connections for 60 s): benchmarks/slow_clients.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.procs import free_port, stop_process, tail, wait_until
from tests.support.robustness_rows import record

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import slow_clients  # noqa: E402

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
THREADS = 4


class Registry:
    def __init__(self, work: Path, *extra: str, env: dict[str, str] | None = None, scheme: str = "http") -> None:
        self.port = free_port()
        self.location = work / "loc"
        self.log = work / "registry.log"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "docket.registry.cli", "--bind", "127.0.0.1", "--advertise-address", "127.0.0.1",
                "--port", str(self.port),
                "--location", str(self.location), "--no-seeding", "--gc-interval", "0", "--log-level", "debug",
                "--threads", str(THREADS), "--max-threads", "64", *extra]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})

    def wait_ready(self, **kw: object) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"registry exited: {tail(self.log)}"
            try:
                return requests.get(self.url + "/healthz", timeout=2, **kw).status_code == 200  # type: ignore[arg-type]
            except requests.RequestException:
                return False

        wait_until(up, timeout=60, what="docket-registry")

    def files(self) -> dict[str, list[str]]:
        return {d: sorted(p.name for p in (self.location / d).rglob("*") if p.is_file())
                for d in ("blobs", "uploads")}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """Short deadlines so that the cases end in seconds; 4 worker threads kept ready."""
    reg = Registry(tmp_path_factory.mktemp("slow"), "--header-timeout", str(HEADER_TIMEOUT),
                   "--body-timeout", str(BODY_TIMEOUT), "--body-min-rate", "1KiB")
    try:
        reg.wait_ready()
        yield reg
    finally:
        stop_process(reg.proc)


def _connect(reg: Registry) -> socket.socket:
    return socket.create_connection(("127.0.0.1", reg.port), timeout=15)


def _read_until_closed(sock: socket.socket, limit: float = 15.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and when it closed (monotonic)."""
    data = b""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data, time.monotonic()


def test_more_slow_connections_than_threads_do_not_stop_the_registry(registry: Registry) -> None:
    """48 slow connections (12 of each kind, reopened when closed) against 4 threads, for 10 s: every normal request
    is answered."""
    attack = slow_clients.Attack("127.0.0.1", registry.port, 48)
    attacker = threading.Thread(target=attack.run)
    attacker.start()
    latencies: list[float] = []
    blob = os.urandom(4096)
    try:
        time.sleep(1.0)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            for method, path, body in (("GET", "/api/v1/images", None), ("GET", "/v2/_catalog", None),
                                       ("POST", "/api/v1/blobs?kind=layer", blob)):
                start = time.monotonic()
                resp = requests.request(method, registry.url + path, data=body, timeout=10,
                                        headers={"Content-Type": "application/octet-stream"} if body else {})
                latencies.append(time.monotonic() - start)
                assert resp.status_code in (200, 201), resp.text
            time.sleep(0.3)
    finally:
        attack.stop.set()
        attacker.join()
    summary = attack.summary()
    assert max(latencies) < 3.0, sorted(latencies)[-5:]
    assert summary["open_failures"] == 0
    for kind in slow_clients.KINDS:  # the connections were really there, and the deadlines closed them
        assert summary[kind]["closed_by_server"] >= 12, summary
    for kind in ("body-post", "body-v2"):
        assert set(summary[kind]["answers"]) == {"408"}, summary
    record("slow clients", "48 slow connections (heads, trickled bodies; reopened) vs --threads 4, 10 s",
           f"{len(latencies)} normal requests all answered, max {max(latencies):.2f} s; slow ones closed by the "
           f"deadlines, bodies with 408")


@pytest.mark.parametrize("opening", [b"GET /api/v1/ima", b"", b"GET /api/v1/images HTTP/1.1\r\nHost: x\r\nX-A: b"],
                         ids=["partial request line", "nothing", "headers never end"])
def test_incomplete_head_is_closed_after_the_header_timeout(registry: Registry, opening: bytes) -> None:
    with _connect(registry) as sock:
        start = time.monotonic()
        sock.sendall(opening)
        data, closed = _read_until_closed(sock)
    took = closed - start
    assert data == b"" and HEADER_TIMEOUT - 0.5 <= took <= HEADER_TIMEOUT + 4, (data, took)
    record("slow clients", f"request head never completes ({opening[:24]!r})",
           f"connection closed after {took:.1f} s (--header-timeout {HEADER_TIMEOUT:g}), no thread held")


def test_kept_alive_connection_that_starts_a_request_and_stalls_is_closed(registry: Registry) -> None:
    with _connect(registry) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += sock.recv(65536)
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head, head
        time.sleep(0.5)
        start = time.monotonic()
        sock.sendall(b"GET /api/v1/ima")
        data, closed = _read_until_closed(sock)
    assert data == b"" and HEADER_TIMEOUT - 0.5 <= closed - start <= HEADER_TIMEOUT + 4, (data, closed - start)


def test_pipelined_requests_are_both_answered(registry: Registry) -> None:
    with _connect(registry) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /api/v1/images HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        data, _ = _read_until_closed(sock)
    assert data.count(b"HTTP/1.1 200") == 2, data[:300]


DIGEST = "sha256:" + hashlib.sha256(b"never sent").hexdigest()
TRICKLES = {
    "/api/v1 push": ("PUT", "/api/v1/repositories/slow/push/tags/v1", "application/x-tar"),
    "/api/v1 blob": ("POST", "/api/v1/blobs?kind=layer", "application/octet-stream"),
    "/api/v1 blob, chunked": ("POST", "/api/v1/blobs?kind=layer", "application/octet-stream"),
    "/api/v1 manifest": ("PUT", "/api/v1/repositories/slow/man/manifests/v1", "application/json"),
    "/v2 monolithic blob": ("POST", f"/v2/slow/mono/blobs/uploads/?digest={DIGEST}", "application/octet-stream"),
    "/v2 manifest": ("PUT", "/v2/slow/man/manifests/v1", "application/vnd.oci.image.manifest.v1+json"),
}


@pytest.mark.parametrize("case", list(TRICKLES))
def test_trickled_body_gets_408_and_nothing_is_stored(registry: Registry, case: str) -> None:
    method, path, ctype = TRICKLES[case]
    chunked = "chunked" in case
    before = registry.files()
    framing = "Transfer-Encoding: chunked" if chunked else "Content-Length: 100000"
    with _connect(registry) as sock:
        sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n{framing}\r\n\r\n".encode())
        start = time.monotonic()
        sock.settimeout(0.5)
        answer = b""
        while time.monotonic() - start < 15 and b"\r\n\r\n" not in answer:
            try:
                sock.sendall(b"1\r\n{\r\n" if chunked else b"{")  # one byte every half second
            except OSError:
                break
            try:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
            except TimeoutError:
                pass
        answered = time.monotonic() - start
        sock.settimeout(5)
        rest, _ = _read_until_closed(sock, 5)  # the server closes: the rest of the body is not waited for
        answer += rest
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"Connection: close" in head
    assert BODY_TIMEOUT - 0.5 <= answered <= BODY_TIMEOUT + 5, answered
    error = json.loads(body)
    code = error["errors"][0]["code"] if "errors" in error else error["error"]["code"]
    assert code == "REQUEST_TIMEOUT", error
    assert registry.files() == before  # no blob, no upload left
    assert requests.get(registry.url + "/api/v1/images", timeout=10).json()["images"] == []
    record("slow clients", f"{case}: body trickled at 2 bytes/s",
           f"408 REQUEST_TIMEOUT after {answered:.1f} s (--body-timeout {BODY_TIMEOUT:g}, --body-min-rate 1KiB), "
           "connection closed, nothing stored")


def test_a_download_read_too_slowly_is_cut_off(registry: Registry) -> None:
    """The sibling on the way out: a client that requests a blob and then hardly reads held its thread for as long
    as it liked."""
    blob = os.urandom(32 * 1024 * 1024)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    resp = requests.post(f"{registry.url}/api/v1/blobs?kind=layer", data=blob, timeout=120,
                         headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code in (200, 201), resp.text
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small buffers: the server's sends block
    sock.settimeout(15)
    try:
        sock.connect(("127.0.0.1", registry.port))
        sock.sendall(f"GET /api/v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        start = time.monotonic()
        got = sock.recv(4096)
        assert got.startswith(b"HTTP/1.1 200"), got[:100]
        time.sleep(BODY_TIMEOUT + 3)  # read nothing while the server waits to send
        data, closed = _read_until_closed(sock, 30)
        got += data
    finally:
        sock.close()
    assert len(got) < len(blob), "the whole blob was sent to a client that did not read"
    assert closed - start < BODY_TIMEOUT + 15
    requests.get(registry.url + "/healthz", timeout=10).raise_for_status()
    record("slow clients", "blob GET read at almost nothing (receive buffer 4 KiB, no reads)",
           f"connection cut after {len(got)} of {len(blob)} bytes (--body-timeout {BODY_TIMEOUT:g}, "
           "--body-min-rate 1KiB); its thread freed")


def test_progress_rule_counts_only_time_spent_waiting_for_the_client() -> None:
    """Unit: the body rule on a socketpair. A peer at 5 bytes/s fails a 100 B/s minimum after one 1 s window; the
    reader's own pauses (the app hashing or writing) do not count against a peer whose bytes are already there."""
    from docket.registry.server import BodyTimeout, Deadlines, _Progress

    deadlines = Deadlines(body_timeout=1.0, body_min_rate=100)
    ours, peer = socket.socketpair()
    stop = threading.Event()

    def trickle() -> None:
        while not stop.wait(0.2):
            with contextlib.suppress(OSError):
                peer.send(b"x")

    feeder = threading.Thread(target=trickle)
    feeder.start()
    try:
        ours.settimeout(60)
        progress = _Progress(deadlines, "the request body")
        start = time.monotonic()
        with pytest.raises(BodyTimeout, match="moved [0-9] bytes in 1 s"):
            while True:
                progress.run(ours, ours.recv_into, bytearray(1024))
        assert 0.9 <= time.monotonic() - start <= 2.5
        with pytest.raises(BodyTimeout):  # and it stays expired for this request
            progress.run(ours, ours.recv_into, bytearray(1024))
        stop.set()
        feeder.join()
        peer.sendall(b"y" * 300)
        progress.reset()
        assert progress.run(ours, ours.recv_into, bytearray(10)) == 10  # fewer than the window's 100 bytes...
        time.sleep(1.5)  # ...then the app pauses longer than a window: not the client's fault
        assert progress.run(ours, ours.recv_into, bytearray(4096)) > 0
    finally:
        stop.set()
        feeder.join()
        ours.close()
        peer.close()


def test_a_large_push_still_streams(registry: Registry) -> None:
    data = os.urandom(64 * 1024 * 1024)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(data), 1024 * 1024):
            yield data[i:i + 1024 * 1024]

    resp = requests.post(f"{registry.url}/api/v1/blobs?kind=layer&digest={digest}", data=chunks(), timeout=120,
                         headers={"Content-Type": "application/octet-stream"})  # chunked transfer encoding
    assert resp.status_code == 201, resp.text
    got = requests.get(f"{registry.url}/api/v1/blobs/{digest}", timeout=120)
    assert got.status_code == 200 and hashlib.sha256(got.content).hexdigest() == digest.split(":")[1]


def test_silent_tls_clients_do_not_stop_an_https_registry(tmp_path: Path) -> None:
    """The TLS handshake ran blocking in cheroot's accepting thread: one silent TCP connection stopped every new
    connection for the whole timeout. Now 20 silent ones (more than --threads) cost nothing and are closed."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True,
                   stdin=subprocess.DEVNULL)
    reg = Registry(tmp_path, "--header-timeout", str(HEADER_TIMEOUT), "--auth-token", "a" * 32,
                   env={"DOCKET_TLS_CERT": str(cert), "DOCKET_TLS_KEY": str(key)}, scheme="https")
    silent: list[socket.socket] = []
    try:
        reg.wait_ready(verify=str(cert))
        silent = [_connect(reg) for _ in range(20)]
        silent[0].sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
        start = time.monotonic()
        resp = requests.get(reg.url + "/api/v1/images", verify=str(cert), timeout=10)
        took = time.monotonic() - start
        assert resp.status_code == 200 and took < 3, took
        with pytest.raises(requests.ConnectionError):  # plain HTTP: closed unanswered, as cheroot did
            requests.get(f"http://127.0.0.1:{reg.port}/healthz", timeout=10)
        closed = 0
        for sock in silent:
            data, _ = _read_until_closed(sock, HEADER_TIMEOUT + 5)
            closed += data == b""
        assert closed == len(silent)
        with ssl.create_default_context(cafile=str(cert)).wrap_socket(_connect(reg), server_hostname="127.0.0.1") \
                as tls:  # a completed handshake with a head that never ends: closed too
            tls.sendall(b"GET /api/v1/ima")
            data, _ = _read_until_closed(tls, HEADER_TIMEOUT + 5)
            assert data == b""
    finally:
        for sock in silent:
            sock.close()
        stop_process(reg.proc)
    record("slow clients", "20 silent TCP connections to an HTTPS registry (--threads 4)",
           f"HTTPS request answered in {took:.2f} s; the silent ones closed after --header-timeout")


def test_max_threads_below_threads_is_refused_before_anything_starts(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "docket.registry.cli", "--bind", "127.0.0.1",
                             "--advertise-address", "127.0.0.1", "--port",
                             str(free_port()), "--location", str(tmp_path / "loc"), "--no-seeding",
                             "--threads", "16", "--max-threads", "4"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode != 0
    assert "docket-registry: error: --max-threads 4 is below --threads 16" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "loc" / "docket.db").exists()
