"""Attacks on the client (issue 11, "Client side"): a hostile registry or tracker on loopback, the real `docket`
CLI as a subprocess against it.

Each server here is a small real HTTP server in the test process that misbehaves on purpose: it trickles one
byte a second, sends a gzip bomb, lies about sizes, nests JSON 100,000 deep, lists 10,000 layers, puts escape
sequences in its error messages. The client must end within its deadlines, in bounded memory, threads and
processes, leave no ctorrent behind, and print remote text escaped.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest


from docket.torrent.metainfo import build_torrent
from tests.support.procs import free_port, process_argvs, wait_until
from tests.support.robustness_rows import record

ESC = "\x1b"
EVIL = "\x1b[2J\x1b]0;pwned\x07\x1b[8mhidden\x1b[0m\r\nPulled and loaded evil:latest (sha256:fake) in 0.1 s"


# -- a hostile server -------------------------------------------------------------------------------------------

Handler = Callable[[BaseHTTPRequestHandler], None]


class Hostile:
    """A loopback HTTP server whose answers are functions of the request path (first matching prefix wins)."""

    def __init__(self) -> None:
        self.routes: list[tuple[str, Handler]] = []
        self.seen: list[str] = []
        hostile = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                hostile.seen.append(f"{self.command} {self.path}")
                for prefix, fn in hostile.routes:
                    if self.path.startswith(prefix):
                        with contextlib.suppress(OSError):
                            fn(self)
                        return
                with contextlib.suppress(OSError):
                    send(self, 404, json.dumps({"error": {"code": "NOT_FOUND", "message": "no"}}).encode())

            do_GET = do_HEAD = do_PUT = do_POST = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, prefix: str, fn: Handler) -> None:
        self.routes.append((prefix, fn))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str = "application/json",
         headers: dict[str, str] | None = None) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def trickle(raw: bytes, every: float = 1.0) -> Handler:
    """The whole raw HTTP answer (status line and headers included), one byte every ``every`` seconds."""
    def fn(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        for i in range(len(raw)):
            h.wfile.write(raw[i:i + 1])
            h.wfile.flush()
            time.sleep(every)
    return fn


def trickle_body(status: int, body: bytes, every: float = 1.0) -> Handler:
    """Headers at once, then the body one byte a second."""
    def fn(h: BaseHTTPRequestHandler) -> None:
        h.close_connection = True
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.flush()
        for i in range(len(body)):
            h.wfile.write(body[i:i + 1])
            h.wfile.flush()
            time.sleep(every)
    return fn


def http_answer(status: int, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            .encode() + body)


@pytest.fixture
def hostile() -> Iterator[Hostile]:
    server = Hostile()
    try:
        yield server
    finally:
        server.close()


# -- images the hostile registry describes -------------------------------------------------------------------------

def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def torrent_of(tmp: Path, data: bytes, announce: str) -> tuple[bytes, Any]:
    tmp.mkdir(parents=True, exist_ok=True)
    src = tmp / hashlib.sha256(data).hexdigest()
    src.write_bytes(data)
    out = tmp / (src.name + ".torrent")
    meta = build_torrent(src, announce, out=out, threads=1)
    return out.read_bytes(), meta


def one_layer_image(server: Hostile, tmp: Path, announce: str, size: int = 300_000) -> dict[str, Any]:
    """A "layers" record of one layer whose config, blob, torrent and bytes the hostile server really serves
    (routes added). Its "digest" is the layer's (the client only checks its form): the tests name the blob by it."""
    blob = os.urandom(size)
    torrent, meta = torrent_of(tmp / "t", blob, announce)
    digest = sha256(blob)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
    image_id = sha256(config)
    rec = {"repository": "evil", "tag": "latest", "ref": "evil:latest", "format": "layers", "digest": digest,
           "image_id": image_id, "size": size, "created": "", "config": {"digest": image_id, "size": len(config)},
           "layers": [{"digest": digest, "diff_id": digest, "size": size, "info_hash": meta.info_hash}]}
    server.route(f"/api/v1/blobs/{digest}/torrent", lambda h: send(h, 200, torrent, "application/x-bittorrent"))
    server.route(f"/api/v1/blobs/{digest}", lambda h: send(h, 200, blob, "application/octet-stream"))
    server.route(f"/api/v1/blobs/{image_id}", lambda h: send(h, 200, config, "application/octet-stream"))
    return rec


def layered_image(server: Hostile, tmp: Path, announce: str, layers: int, size: int = 20_000,
                  serve: bool = True) -> tuple[dict[str, Any], bytes]:
    """A "layers" record of ``layers`` distinct small layers (their torrents served when ``serve``)."""
    blobs = [os.urandom(size) for _ in range(layers)]
    digests = [sha256(b) for b in blobs]
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": digests}}).encode()
    entries = []
    for blob, digest in zip(blobs, digests):
        if serve:
            torrent, meta = torrent_of(tmp / "t", blob, announce)
            server.route(f"/api/v1/blobs/{digest}/torrent",
                         lambda h, t=torrent: send(h, 200, t, "application/x-bittorrent"))
            ih = meta.info_hash
        else:
            ih = hashlib.sha1(digest.encode()).hexdigest()
        entries.append({"digest": digest, "diff_id": digest, "size": size, "info_hash": ih})
    image_id = sha256(config)
    server.route(f"/api/v1/blobs/{image_id}", lambda h: send(h, 200, config, "application/octet-stream"))
    rec = {"repository": "evil", "tag": "latest", "ref": "evil:latest", "format": "layers",
           "digest": sha256(b"manifest"), "image_id": image_id, "size": len(config) + size * layers,
           "config": {"digest": image_id, "size": len(config)}, "layers": entries}
    return rec, config


TAG = "/api/v1/repositories/evil/tags/latest"


def cli_args(server: Hostile, *args: str) -> list[str]:
    return ["--host", "http://127.0.0.1", "--port", str(server.port), *args]


def docket_cmd(location: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "docket.client.cli", "--location", str(location), *args]


def run_measured(location: Path, *args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, int]:
    """The docket CLI run by a small wrapper that reports its peak RSS (KiB) from getrusage(RUSAGE_CHILDREN)."""
    wrapper = ("import resource, subprocess, sys\n"
               "r = subprocess.run(sys.argv[1:])\n"
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
               "sys.exit(r.returncode)\n")
    proc = subprocess.run([sys.executable, "-c", wrapper, *docket_cmd(location, *args)], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)
    peak = int(proc.stderr.rsplit("PEAK_RSS_KB", 1)[1].split()[0])
    return proc, peak


def ctorrents_under(path: Path) -> list[int]:
    """Pids of ctorrent processes whose command line names ``path`` (ours: the test's tmp_path)."""
    return [pid for pid, argv in process_argvs()
            if argv and os.path.basename(argv[0]) == b"ctorrent" and any(str(path).encode() in a for a in argv)]


def running(pid: int) -> bool:
    """The pid exists and is not a zombie (a killed child waits there for init to reap it)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1] not in ("Z", "X")
    except OSError:
        return False
    return False


def threads_of(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Threads:"):
                return int(line.split()[1])
    except OSError:
        return 0
    return 0


@pytest.fixture
def reap_ctorrents(tmp_path: Path) -> Iterator[None]:
    """Whatever happens, no ctorrent of this test outlives it (found by our tmp_path in its argv, killed by pid)."""
    yield
    for pid in ctorrents_under(tmp_path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# -- deadlines ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("what", ["headers", "record", "torrent", "config"])
def test_a_trickling_registry_cannot_hold_a_pull(hostile: Hostile, tmp_path: Path, docket_cli, what: str) -> None:
    """One byte a second, in the headers, the record, a .torrent or the config: the pull ends by its deadline."""
    deadline = 3.0
    if what in ("headers", "record", "torrent"):
        rec = one_layer_image(hostile, tmp_path, "http://127.0.0.1:1/announce")
    else:
        rec, _ = layered_image(hostile, tmp_path, "http://127.0.0.1:1/announce", 1)
    body = json.dumps(rec).encode()
    if what == "headers":
        hostile.route(TAG, trickle(http_answer(200, body)))
    elif what == "record":
        hostile.route(TAG, trickle_body(200, body))
    else:
        hostile.route(TAG, lambda h: send(h, 200, body))
        target = f"/api/v1/blobs/{rec['digest']}/torrent" if what == "torrent" else f"/api/v1/blobs/{rec['image_id']}"
        hostile.routes.insert(0, (target, trickle_body(200, b"x" * 10_000)))
    t0 = time.monotonic()
    res = docket_cli(*cli_args(hostile, "--timeout", str(deadline), "pull", "--no-load", "evil:latest"),
                     check=False, timeout=60)
    took = time.monotonic() - t0
    assert res.returncode == 8, res.stderr
    assert f"did not answer within {deadline:g} s" in res.stderr
    assert took < 2 * deadline + 5, took  # interpreter start-up included
    assert not list((tmp_path / "client").glob("blobs/*")) or what in ("config",)
    record("client", f"registry trickles its {what} (1 byte/s), --timeout {deadline:g}",
           f"exit 8 after {took:.1f} s: 'did not answer within {deadline:g} s (the whole answer ...)'")


def test_a_trickled_blob_download_ends_by_its_progress_deadline(hostile: Hostile, tmp_path: Path,
                                                                docket_cli) -> None:
    """--transport http, the blob at 1 byte/s: each 256 KiB must arrive within --timeout, so the pull fails soon
    (exit 9, the partial file kept for a retry) instead of running for days."""
    deadline = 3.0
    rec = one_layer_image(hostile, tmp_path, "http://127.0.0.1:1/announce")
    hostile.routes.insert(0, (f"/api/v1/blobs/{rec['digest']}", lambda h: None))  # placeholder, replaced below

    def slow_blob(h: BaseHTTPRequestHandler) -> None:
        if h.path.endswith("/torrent"):
            send(h, 200, (tmp_path / "t" / (rec["digest"][7:] + ".torrent")).read_bytes(), "application/x-bittorrent")
            return
        trickle_body(200, b"\0" * rec["size"])(h)
    hostile.routes[0] = (f"/api/v1/blobs/{rec['digest']}", slow_blob)
    hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
    t0 = time.monotonic()
    res = docket_cli(*cli_args(hostile, "--timeout", str(deadline), "pull", "--no-load", "--transport", "http",
                               "evil:latest"), check=False, timeout=120)
    took = time.monotonic() - t0
    assert res.returncode == 9, res.stderr
    assert f"sent less than 262144 bytes in {deadline:g} s" in res.stderr
    assert took < 4 * deadline + 5, took
    record("client", f"registry sends a blob at 1 byte/s (--transport http, --timeout {deadline:g})",
           f"exit 9 after {took:.1f} s: 'sent less than 262144 bytes in {deadline:g} s', partial file kept")


def tracker_server(hostile: Hostile, scrape: Handler, announce: Handler | None = None) -> str:
    hostile.route("/scrape", scrape)
    if announce is not None:
        hostile.route("/announce", announce)
    return f"{hostile.url}/announce"


def test_a_trickling_tracker_does_not_hold_the_first_check(hostile: Hostile, tmp_path: Path, docket_cli) -> None:
    """auto: the tracker check before the download ends within its deadline and the pull continues over HTTP."""
    tracker = Hostile()
    try:
        announce = tracker_server(tracker, trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n" + b"d" * 50))
        rec = one_layer_image(hostile, tmp_path, announce)
        hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
        t0 = time.monotonic()
        res = docket_cli(*cli_args(hostile, "pull", "--no-load", "--seed-time", "0", "--json", "evil:latest"),
                         check=False, timeout=120)
        took = time.monotonic() - t0
    finally:
        tracker.close()
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["transport"] == "http" and "timed out" in summary["fallback_reason"], summary
    assert took < 20, took
    record("client", "tracker trickles its scrape answer (1 byte/s), --transport auto",
           f"the first tracker check gave up after its 5 s deadline ('timed out'); pulled over HTTP in {took:.1f} s")


def test_a_trickling_tracker_does_not_extend_the_seeding(hostile: Hostile, tmp_path: Path, docket_cli,
                                                         reap_ctorrents: None) -> None:
    """p2p: a real seeder, a tracker that answers announces but trickles every scrape: seeding still ends about
    --seed-time after the download (each scrape is cut at its 5 s deadline)."""
    from docket.torrent.ctorrent import CtorrentProcess

    seed_port = free_port()
    # not 127.0.0.1: the pull's ctorrent connects from 127.0.0.1 and ctorrent drops peers with its own address
    peers = bytes([127, 0, 0, 77]) + seed_port.to_bytes(2, "big")
    tracker = Hostile()
    try:
        announce = tracker_server(
            tracker, trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 600\r\n\r\n" + b"d" * 600),
            lambda h: send(h, 200, b"d8:intervali30e5:peers6:" + peers + b"e", "text/plain"))
        rec = one_layer_image(hostile, tmp_path, announce)
        hexd = rec["digest"].split(":", 1)[1]
        hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
        with CtorrentProcess(tmp_path / "t" / f"{hexd}.torrent", tmp_path / "t" / hexd, workdir=tmp_path / "seed",
                             listen_ip="127.0.0.77", port=seed_port, seed_only=True) as seeder:
            seeder.wait_listening(10)
            t0 = time.monotonic()
            res = docket_cli(*cli_args(hostile, "pull", "--no-load", "--transport", "p2p", "--wait", "--seed-time", "3",
                                       "--json", "evil:latest"), check=False, timeout=180)
            took = time.monotonic() - t0
    finally:
        tracker.close()
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["transport"] == "p2p"
    assert took < 40, took
    record("client", "tracker trickles its scrape answers while the pull seeds (--transport p2p --wait --seed-time 3)",
           f"each scrape cut at 5 s; the pull (download + seeding) ended after {took:.1f} s")


# -- sizes ---------------------------------------------------------------------------------------------------------

def test_a_gzip_bomb_record_is_refused_in_bounded_memory(hostile: Hostile, tmp_path: Path) -> None:
    bomb = gzip.compress(b" " * (1024 * 1024 * 1024), compresslevel=9)  # 1 GiB of whitespace, ~1 MB compressed
    assert len(bomb) < 2 * 1024 * 1024
    hostile.route(TAG, lambda h: send(h, 200, bomb, headers={"Content-Encoding": "gzip"}))
    res, peak_kb = run_measured(tmp_path / "client", *cli_args(hostile, "pull", "--no-load", "evil:latest"))
    assert res.returncode == 6, res.stderr
    assert "larger than 8388608 bytes; refused" in res.stderr
    assert peak_kb < 200 * 1024, peak_kb
    record("client", "record is a 1 MB gzip bomb (1 GiB of whitespace)",
           f"exit 6 'larger than 8388608 bytes; refused', peak RSS {peak_kb // 1024} MiB")


def test_an_endless_record_is_refused_in_bounded_memory(hostile: Hostile, tmp_path: Path) -> None:
    def endless(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(512 * 1024 * 1024))
        h.end_headers()
        chunk = b" " * (1024 * 1024)
        for _ in range(512):
            h.wfile.write(chunk)
    hostile.route(TAG, endless)
    res, peak_kb = run_measured(tmp_path / "client", *cli_args(hostile, "pull", "--no-load", "evil:latest"))
    assert res.returncode == 6, res.stderr
    assert "refused" in res.stderr
    assert peak_kb < 200 * 1024, peak_kb
    record("client", "record of 512 MiB of whitespace", f"exit 6 after 8 MiB read, peak RSS {peak_kb // 1024} MiB")


@pytest.mark.parametrize("doc", ["100,000 nested brackets", "duplicate keys"])
def test_json_the_strict_parser_refuses_is_refused(hostile: Hostile, tmp_path: Path, docket_cli, doc: str) -> None:
    rec = one_layer_image(hostile, tmp_path, "http://127.0.0.1:1/announce")
    if doc == "duplicate keys":  # two readers could see two records: refused, as the registry refuses manifests
        body = json.dumps(rec)[:-1].encode() + b', "digest": "sha256:' + b"0" * 64 + b'"}'
    else:
        body = b"[" * 100_000 + b"]" * 100_000
    hostile.route(TAG, lambda h: send(h, 200, body))
    res = docket_cli(*cli_args(hostile, "pull", "--no-load", "evil:latest"), check=False, timeout=60)
    assert res.returncode == 6, res.stderr
    assert "RecursionError" not in res.stderr and "unexpected" not in res.stderr
    assert ("nests deeper than 64 levels" if doc != "duplicate keys" else "digest") in res.stderr
    error = next(line for line in res.stderr.splitlines() if line.startswith("Error: "))
    record("client", f"record of {doc}", "exit 6 (the shared strict JSON parser): " + error[7:150])


@pytest.mark.parametrize("lie", ["record size 50 GiB", "config size 50 GiB", "config longer than its size"])
def test_sizes_that_do_not_add_up_are_refused(hostile: Hostile, tmp_path: Path, docket_cli, lie: str) -> None:
    rec, config = layered_image(hostile, tmp_path, "http://127.0.0.1:1/announce", 2)
    if lie == "record size 50 GiB":
        rec["size"] = 50 << 30
    elif lie == "config size 50 GiB":
        rec["config"]["size"] = 50 << 30
        rec["size"] = (50 << 30) + sum(layer["size"] for layer in rec["layers"])
    else:
        rec["config"]["size"] -= 1
        rec["size"] -= 1
    hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
    res = docket_cli(*cli_args(hostile, "pull", "--no-load", "evil:latest"), check=False, timeout=60)
    assert res.returncode == 6, res.stderr
    assert str(50 << 30) not in res.stdout
    if lie != "config longer than its size":  # refused before the config is fetched
        assert not any(s.startswith(f"GET /api/v1/blobs/{rec['image_id']}") for s in hostile.seen), hostile.seen
    error = next(line for line in res.stderr.splitlines() if line.startswith("Error: "))
    record("client", lie, "exit 6 before any download: " + error[7:150])


# -- work a record can ask for -----------------------------------------------------------------------------------------

def test_ten_thousand_layers_are_refused_before_any_work(hostile: Hostile, tmp_path: Path, docket_cli) -> None:
    rec, _ = layered_image(hostile, tmp_path, "http://127.0.0.1:1/announce", 10_000, size=1, serve=False)
    hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
    t0 = time.monotonic()
    res = docket_cli(*cli_args(hostile, "pull", "--no-load", "evil:latest"), check=False, timeout=60)
    took = time.monotonic() - t0
    assert res.returncode == 6, res.stderr
    assert "lists 10000 layers; the limit is 1000" in res.stderr
    assert hostile.seen == [f"GET {TAG}"], hostile.seen[:5]  # not one torrent or config request
    record("client", "record lists 10,000 layers", f"exit 6 in {took:.1f} s before any other request: "
                                                   "'lists 10000 layers; the limit is 1000'")


def start_pull(location: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(docket_cmd(location, *args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_many_layers_run_a_bounded_pool_and_no_ctorrent_outlives_the_pull(
        hostile: Hostile, tmp_path: Path, reap_ctorrents: None, sig: signal.Signals) -> None:
    """200 layers through BitTorrent (a tracker nobody answers): at most 3 ctorrents at a time, few threads; the
    pull killed by ``sig``: every ctorrent it started dies with it (none left with parent 1)."""
    dead_tracker = f"http://127.0.0.1:{free_port()}/announce"
    rec, _ = layered_image(hostile, tmp_path, dead_tracker, 200, size=70_000)
    hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
    pull = start_pull(tmp_path / "client", *cli_args(hostile, "pull", "--no-load", "--transport", "p2p",
                                                     "--stall-timeout", "300", "evil:latest"))
    try:
        wait_until(lambda: ctorrents_under(tmp_path), timeout=60, what="the pull's first ctorrents")
        most, threads = 0, 0
        t_end = time.monotonic() + 4
        while time.monotonic() < t_end:
            most = max(most, len(ctorrents_under(tmp_path)))
            threads = max(threads, threads_of(pull.pid))
            time.sleep(0.1)
        assert pull.poll() is None, pull.communicate()
        assert 1 <= most <= 3, most
        assert threads <= 20, threads
        started = ctorrents_under(tmp_path)
        os.kill(pull.pid, sig)
        pull.wait(30)
        wait_until(lambda: not ctorrents_under(tmp_path), timeout=15, what="the ctorrents to end with the pull")
        assert not [pid for pid in started if running(pid)]
    finally:
        if pull.poll() is None:
            pull.kill()
            pull.wait(10)
    record("client", f"record of 200 layers through BitTorrent, pull then killed by {sig.name}",
           f"at most {most} ctorrents and {threads} threads at a time; none left after {sig.name} (PR_SET_PDEATHSIG"
           + (", SIGHUP unwinds like SIGTERM" if sig == signal.SIGHUP else "") + ")")


def test_a_pull_stops_an_orphan_writer_of_its_blob(hostile: Hostile, tmp_path: Path, reap_ctorrents: None,
                                                   docket_cli) -> None:
    """A ctorrent an older pull left writing the blob (its pid recorded) is stopped before the next pull writes."""
    from docket.torrent.ctorrent import find_ctorrent

    tracker = f"http://127.0.0.1:{free_port()}/announce"
    rec = one_layer_image(hostile, tmp_path, tracker)
    hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
    hexd = rec["digest"].split(":", 1)[1]
    workdir = tmp_path / "client" / "torrents" / hexd
    workdir.mkdir(parents=True)
    (workdir / f"{hexd}.torrent").write_bytes((tmp_path / "t" / (hexd + ".torrent")).read_bytes())
    # a real orphan: started by a shell that exits at once, so its parent is no longer anyone of ours
    argv = [find_ctorrent(), "-e", "1", "-s", str(tmp_path / "client" / "blobs" / hexd),
            "-b", str(workdir / f"{hexd}.bf"), str(workdir / f"{hexd}.torrent")]
    out = subprocess.run(["sh", "-c", 'cd "$1" && shift && "$@" </dev/null >/dev/null 2>&1 & echo $!', "sh",
                          str(workdir), *argv], capture_output=True, text=True, timeout=30, check=True).stdout
    orphan = int(out.strip())
    try:
        wait_until(lambda: running(orphan) and ctorrents_under(tmp_path), timeout=10, what="the orphan")
        (workdir / "ctorrent.pid").write_text(f"{orphan}\n")
        res = docket_cli(*cli_args(hostile, "pull", "--no-load", "--transport", "http", "evil:latest"),
                         check=False, timeout=120)
        assert res.returncode == 0, res.stderr
        assert "Stopped a ctorrent an interrupted pull left running" in res.stderr
        assert not running(orphan)
    finally:
        if running(orphan):
            os.kill(orphan, signal.SIGKILL)
    record("client", "a ctorrent left writing the blob by an earlier pull (pid file in its work directory)",
           "the next pull stops it before it writes, then downloads and verifies")


# -- the terminal -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "code", "exit_code"), [(500, "INTERNAL", 1), (401, "UNAUTHORIZED", 5)])
def test_escape_sequences_in_registry_errors_are_escaped(hostile: Hostile, tmp_path: Path, docket_cli, status: int,
                                                         code: str, exit_code: int) -> None:
    body = json.dumps({"error": {"code": code, "message": "no such image" + EVIL, "hint": "try " + EVIL}})
    hostile.route(TAG, lambda h: send(h, status, body.encode()))
    res = docket_cli(*cli_args(hostile, "pull", "--no-load", "evil:latest"), check=False, timeout=60)
    assert res.returncode == exit_code, res.stderr
    out = res.stdout + res.stderr
    assert ESC not in out and "\x07" not in out and "\r" not in out
    assert "no such image\\x1b[2J" in res.stderr
    assert not any(line.startswith("Pulled and loaded") for line in out.splitlines())
    record("client", f"escape sequences and a fake success line in a registry's HTTP {status} error message and hint",
           f"printed escaped (\\x1b[2J ... \\x0d\\x0a) on the error's own line; exit {exit_code}")


def test_escape_sequences_in_a_tracker_failure_reason_are_escaped(hostile: Hostile, tmp_path: Path, docket_cli,
                                                                  reap_ctorrents: None) -> None:
    reason = ("not allowed" + EVIL).encode()
    failure = b"d14:failure reason" + str(len(reason)).encode() + b":" + reason + b"e"
    tracker = Hostile()
    try:
        announce = tracker_server(tracker, lambda h: send(h, 200, b"d5:filesdee", "text/plain"),
                                  lambda h: send(h, 200, failure, "text/plain"))
        rec = one_layer_image(hostile, tmp_path, announce)
        hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
        res = docket_cli(*cli_args(hostile, "pull", "--no-load", "--transport", "p2p", "--stall-timeout", "6",
                                   "evil:latest"), check=False, timeout=120)
    finally:
        tracker.close()
    assert res.returncode == 9, res.stderr
    out = res.stdout + res.stderr
    assert "not allowed" in out and "\\x1b" in out
    assert ESC not in out and "\x07" not in out
    assert not any(line.startswith("Pulled and loaded") for line in out.splitlines())
    record("client", "escape sequences in a tracker's failure reason (ctorrent prints it)",
           "exit 9, the reason printed escaped in the error and ctorrent's tail")


# -- smaller ----------------------------------------------------------------------------------------------------------

def test_output_in_a_missing_directory_is_refused_before_the_download(hostile: Hostile, tmp_path: Path,
                                                                      docket_cli) -> None:
    rec = one_layer_image(hostile, tmp_path, "http://127.0.0.1:1/announce")
    hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
    res = docket_cli(*cli_args(hostile, "pull", "--no-load", "-o", str(tmp_path / "missing" / "x.tar"),
                               "evil:latest"), check=False, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "is not a directory" in res.stderr
    assert hostile.seen == []
    record("client", "-o in a missing directory", "exit 2 before any request to the registry")


def test_an_unwritable_cache_is_a_clear_error(hostile: Hostile, tmp_path: Path) -> None:
    """As an unprivileged user (root writes anywhere): blobs/ that user may not write gives a message, not
    "unexpected PermissionError"."""
    rec = one_layer_image(hostile, tmp_path, "http://127.0.0.1:1/announce")
    hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
    base = Path(tempfile.mkdtemp(prefix="docket-attack-"))  # tmp_path's parents are root's 0700
    try:
        location = base / "client"
        (location / "blobs").mkdir(parents=True)
        os.chmod(base, 0o755)
        os.chmod(location, 0o777)
        os.chmod(location / "blobs", 0o755)  # root's, not writable by nobody
        res = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                              *docket_cmd(location, *cli_args(hostile, "pull", "--no-load", "--transport", "http",
                                                              "evil:latest"))],
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                             env={**os.environ, "HOME": str(location)})
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert res.returncode == 1, res.stderr
    assert "unexpected" not in res.stderr
    assert f"cannot write in {location / 'blobs'}" in res.stderr
    record("client", "blobs/ in the cache not writable", "exit 1 'cannot write in .../blobs: permission denied' "
                                                         "with a hint, no traceback")


def test_verified_bytes_counts_only_pieces_that_verify(tmp_path: Path) -> None:
    """bytes_resumed: a piece ctorrent's bitfield marks as present but whose bytes are poison is not "resumed"."""
    from docket.client.http_fetch import piece_hashes, verified_bytes

    data = os.urandom(4 * 65536 + 100)
    torrent, meta = torrent_of(tmp_path / "t", data, "http://127.0.0.1:1/announce")
    hashes = piece_hashes(torrent)
    blob = tmp_path / "blob"
    poisoned = bytearray(data)
    poisoned[65536 + 5] ^= 0xFF  # piece 1
    blob.write_bytes(bytes(poisoned))
    every = bytes([0b11111000])  # 5 pieces, all marked present
    assert meta.pieces == 5
    assert verified_bytes(blob, len(data), meta.piece_length, hashes, every) == len(data) - 65536
    assert verified_bytes(blob, len(data), meta.piece_length, hashes, bytes([0b10000000])) == 65536
    record("client", "resumed file with a poisoned piece its bitfield marks present",
           "bytes_resumed counts only the pieces whose SHA-1 matches (the poisoned one is fetched again)")


def test_too_many_open_files_gets_its_own_hint(hostile: Hostile, tmp_path: Path, reap_ctorrents: None) -> None:
    """200 layers under a hard limit of 64 open files: the error says so, not "install ctorrent"."""
    import errno
    import resource

    from docket.torrent.ctorrent import INSTALL_HINT, _start_hint

    rec, _ = layered_image(hostile, tmp_path, f"http://127.0.0.1:{free_port()}/announce", 200, size=70_000)
    hostile.route(TAG, lambda h: send(h, 200, json.dumps(rec).encode()))
    res = subprocess.run(docket_cmd(tmp_path / "client", *cli_args(hostile, "pull", "--no-load", "--transport", "p2p",
                                                                    "evil:latest")),
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    assert res.returncode == 1, res.stderr
    assert "Too many open files" in res.stderr and "raise the limit (ulimit -n)" in res.stderr
    assert "install" not in res.stderr and "unexpected" not in res.stderr
    assert "ulimit -n" in _start_hint(OSError(errno.EMFILE, "Too many open files"))
    assert _start_hint(OSError(errno.ENOENT, "No such file")) == INSTALL_HINT
    record("client", "200 layers with a hard limit of 64 open files",
           "exit 1 'Too many open files' with the hint 'raise the limit (ulimit -n)', not 'install ctorrent'")


def test_cleanup_stops_every_ctorrent_without_a_new_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           reap_ctorrents: None) -> None:
    """When threads ran out, the old cleanup needed one thread per ctorrent and left them seeding: stop_many (what a
    layer pull's cleanup calls) works from the calling thread alone."""
    from docket.torrent.ctorrent import CtorrentProcess, stop_many

    data = os.urandom(100_000)
    _, meta = torrent_of(tmp_path / "t", data, f"http://127.0.0.1:{free_port()}/announce")
    hexd = hashlib.sha256(data).hexdigest()
    procs = [CtorrentProcess(tmp_path / "t" / f"{hexd}.torrent", tmp_path / "t" / hexd, workdir=tmp_path / f"w{i}",
                             listen_ip=f"127.0.0.{101 + i}", seed_only=True, die_with_parent=True) for i in range(6)]
    try:
        for proc in procs:
            proc.start()
        assert all(proc.alive() for proc in procs)

        def no_thread(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")
        monkeypatch.setattr(threading.Thread, "start", no_thread)
        t0 = time.monotonic()
        stop_many(procs, 2.0)
        took = time.monotonic() - t0
        monkeypatch.undo()
        assert not any(proc.alive() for proc in procs)
        assert not ctorrents_under(tmp_path)
    finally:
        monkeypatch.undo()
        for proc in procs:
            proc.stop(1.0)
    record("client", "cleanup of 6 ctorrents while no thread can be started",
           f"all stopped from the calling thread in {took:.1f} s (signals to all, one wait), none left")


def test_escape_sequences_in_image_names_are_escaped(hostile: Hostile, docket_cli) -> None:
    """`docket images` prints what the registry lists: a tag name that is an escape sequence is shown escaped."""
    images = {"images": [{"ref": "evil:" + EVIL, "image_id": "sha256:" + "a" * 64, "size": 1,
                          "created": "\x1b[2J", "digest": "sha256:\x1b]0;t\x07" + "b" * 60}]}
    hostile.route("/api/v1/images", lambda h: send(h, 200, json.dumps(images).encode()))
    for args in ([], ["-q"]):
        res = docket_cli(*cli_args(hostile, *args, "images"), check=False, timeout=60)
        assert res.returncode == 0, res.stderr
        assert ESC not in res.stdout and "\x07" not in res.stdout and "\r" not in res.stdout
        assert "evil:\\x1b[2J" in res.stdout
        assert not any(line.startswith("Pulled and loaded") for line in res.stdout.splitlines())
    record("client", "escape sequences in the names, dates and digests `docket images` lists",
           "printed escaped in the table and with -q")


def test_a_live_pulls_ctorrent_is_not_taken_for_an_orphan(tmp_path: Path, reap_ctorrents: None) -> None:
    """A ctorrent whose parent is a running pull (here: this process) keeps seeding when a second pull of the
    same blob takes the lock."""
    from docket.client.cache import stop_orphan_writer
    from docket.torrent.ctorrent import CtorrentProcess
    from docket.torrent.ctorrent_engine import PID_FILE as PIDFILE, CtorrentEngine

    data = os.urandom(100_000)
    torrent_of(tmp_path / "t", data, f"http://127.0.0.1:{free_port()}/announce")
    hexd = hashlib.sha256(data).hexdigest()
    workdir = tmp_path / "w"
    with CtorrentProcess(tmp_path / "t" / f"{hexd}.torrent", tmp_path / "t" / hexd, workdir=workdir,
                         listen_ip="127.0.0.111", seed_only=True, die_with_parent=True,
                         pid_file=workdir / PIDFILE) as proc:
        assert (workdir / PIDFILE).read_text().strip() == str(proc.pid)
        assert stop_orphan_writer(CtorrentEngine(), workdir) is False
        assert proc.alive()
    record("client", "a second pull of a blob another running pull still seeds",
           "the seeding ctorrent (its parent a live pull) is left alone; only orphans are stopped")
