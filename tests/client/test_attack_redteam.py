"""Red-team pass on the client, the tracker program and the torrent layer (issue 11), after the parallel fixes.

Each test is an attack that got through the integrated build, with the fix's proof: real loopback servers in the
test process, real ctorrent processes, the real ``docket`` CLI where the user meets it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import select
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests


from docket.deadline import DeadlineExceeded, DeadlineSession
from tests.support.robustness_rows import record


# -- a raw loopback server: one function per accepted connection --------------------------------------------------

class RawServer:
    """Accepts on 127.0.0.1 and runs ``serve(conn)`` in a thread per connection; stops them all on close."""

    def __init__(self, serve) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.serve = serve
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(5)
            conn.recv(65536)
            self.serve(conn, self.stop)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def raw_server(serve) -> Iterator[RawServer]:
    server = RawServer(serve)
    try:
        yield server
    finally:
        server.close()


def _trickle_after(head: bytes):
    def serve(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(head)
        while not stop.wait(1.0):  # one byte a second, forever
            conn.sendall(b"x")
    return serve


@pytest.mark.parametrize("head", [
    pytest.param(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n", id="http1.0-no-length"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n",
                 id="http1.1-close-delimited"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["read", "stream"])
def test_a_close_delimited_trickle_is_cut_at_the_deadline(head: bytes, stream: bool) -> None:
    """http.client hands the socket of a reply without a length to the response (conn.sock is None): the
    deadline must still reach it."""
    with raw_server(_trickle_after(head)) as server, DeadlineSession(2.0) as session:
        t0 = time.monotonic()
        with pytest.raises(requests.exceptions.RequestException):
            resp = session.get(f"http://127.0.0.1:{server.port}/record", timeout=(2, 5), stream=stream)
            for _ in resp.iter_content(1024):
                pass
            if resp.watch.expired:  # a stream cut short looks like a short body: the caller checks expired
                raise DeadlineExceeded("cut")
        took = time.monotonic() - t0
    assert took < 3.0, f"a close-delimited trickle took {took:.1f} s against a 2 s deadline"
    record("client: deadlines", f"a reply without Content-Length ({head.split(b' ')[0].decode()}, "
           f"{'streamed' if stream else 'read'}) trickled 1 byte/s, 2 s deadline",
           f"cut after {took:.1f} s (was 6 s: the watchdog found no socket once http.client owned it)")


# -- ctorrent ports ---------------------------------------------------------------------------------------------

def test_ctorrents_started_back_to_back_listen_on_the_ports_chosen_for_them(tmp_path: Path) -> None:
    """free_listen_port probed a port that the previous ctorrent had been given but not yet bound: two got the same
    one, ctorrent moved one down by itself, and the tracker kept the announced port as a stale peer."""
    from tests.support.procs import free_port
    from docket.torrent.ctorrent import CtorrentProcess, stop_many
    from docket.torrent.metainfo import build_torrent

    ip = "127.0.0.73"
    dead_tracker = f"http://127.0.0.1:{free_port()}/announce"
    procs = []
    try:
        for i in range(5):
            data = tmp_path / f"layer{i}"
            data.write_bytes(bytes([i]) * 40_000)
            build_torrent(data, dead_tracker, out=tmp_path / f"layer{i}.torrent")
            procs.append(CtorrentProcess(tmp_path / f"layer{i}.torrent", data, workdir=tmp_path / f"w{i}",
                                         listen_ip=ip, seed_only=True))
        for proc in procs:
            proc.start()  # back to back: none has bound its port yet
        chosen = [p.port for p in procs]
        real = [p.wait_listening(20) for p in procs]
    finally:
        stop_many(procs)
    assert len(set(chosen)) == len(chosen), f"one port handed to two ctorrents: {chosen}"
    assert real == chosen, f"ctorrent moved off the port announced for it: chose {chosen}, listening {real}"
    record("torrent: ports", "5 ctorrents started back to back on one IP in one process",
           f"5 distinct ports, each listening where it was told ({chosen[0]}..{chosen[-1]}); "
           "before: two got the same port and one moved, a stale tracker entry")


# -- remote text on a terminal ------------------------------------------------------------------------------------

def _listing_server(images: dict):
    body = json.dumps(images).encode()

    def serve(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    return serve


def _run_on_pty(args: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run a command with stdout and stderr on a pseudo-terminal (the rich table is drawn only for a tty)."""
    master, slave = os.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "250"}
    try:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
        os.close(slave)
        out = bytearray()
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            elif proc.poll() is not None:
                break
        rc = proc.wait(timeout=10)
    finally:
        os.close(master)
    return rc, out.decode("utf-8", "replace")


def test_rich_markup_in_image_names_is_not_interpreted_on_a_terminal(tmp_path: Path) -> None:
    """On a terminal `docket images` draws a rich table: a registry's '[link=...]' became an OSC 8 hyperlink
    (an escape sequence the client emitted itself) and '[/]' crashed the listing with a MarkupError."""
    images = {"images": [
        {"ref": "[link=https://evil.example]docket/app:latest[/link]", "image_id": "sha256:" + "a" * 64,
         "size": 1, "created": "[reverse]now", "digest": "sha256:" + "b" * 64},
        {"ref": "docket/x:[/]", "image_id": "sha256:" + "c" * 64, "size": 2, "created": "", "digest": ""},
    ]}
    with raw_server(_listing_server(images)) as server:
        rc, out = _run_on_pty([sys.executable, "-m", "docket.client.cli", "--location", str(tmp_path / "loc"),
                               "--host", "http://127.0.0.1", "--port", str(server.port), "images"])
    assert rc == 0, out
    assert "\x1b]8" not in out and "evil.example]docket/app" in out, out
    assert "[/]" in out and "[reverse]" in out
    record("client: terminal", "rich markup ('[link=...]', '[/]') in the names `docket images` draws on a tty",
           "shown as text; before: an OSC 8 hyperlink escape emitted, and '[/]' an unexpected MarkupError (exit 1)")


# -- the cache and -o ---------------------------------------------------------------------------------------------

class TarballRegistry:
    """A loopback "registry" serving a one-layer image (record, config, torrent, blob) with a dead tracker in it.
    (Named after the whole-tarball image it served before docket pulled layers only: its one layer is the blob.)"""

    def __init__(self, tmp: Path, announce: str | None = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        from tests.support.procs import free_port
        from docket.torrent.metainfo import build_torrent

        self.blob = os.urandom(200_000)
        self.hex = hashlib.sha256(self.blob).hexdigest()
        src = tmp / "src" / self.hex
        src.parent.mkdir(parents=True)
        src.write_bytes(self.blob)
        meta = build_torrent(src, announce or f"http://127.0.0.1:{free_port()}/announce", out=tmp / "src" / "t.torrent")
        self.info_hash = meta.info_hash
        digest = "sha256:" + self.hex
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
        image_id = "sha256:" + hashlib.sha256(config).hexdigest()
        record = {"repository": "evil", "tag": "latest", "ref": "evil:latest", "format": "layers",
                  "digest": digest, "image_id": image_id, "size": len(self.blob), "created": "",
                  "config": {"digest": image_id, "size": len(config)},
                  "layers": [{"digest": digest, "size": len(self.blob), "info_hash": meta.info_hash}]}
        self.routes = routes = {"/api/v1/repositories/evil/tags/latest": json.dumps(record).encode(),
                  f"/api/v1/blobs/sha256:{self.hex}/torrent": (tmp / "src" / "t.torrent").read_bytes(),
                  f"/api/v1/blobs/sha256:{self.hex}": self.blob, f"/api/v1/blobs/{image_id}": config}
        self.seen: list[str] = []
        seen = self.seen

        class H(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                seen.append(self.path)
                body = routes.get(self.path.split("?")[0])
                self.send_response(200 if body is not None else 404)
                body = body if body is not None else b'{"error": {"code": "NOT_FOUND", "message": "no"}}'
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def args(self, location: Path, *args: str) -> list[str]:
        return ["--location", str(location), "--host", "http://127.0.0.1", "--port",
                str(self.server.server_address[1]), *args]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def tarball_registry(tmp_path: Path) -> Iterator[TarballRegistry]:
    server = TarballRegistry(tmp_path)
    try:
        yield server
    finally:
        server.close()


def test_links_planted_in_the_cache_are_not_written_through(tarball_registry: TarballRegistry, tmp_path: Path,
                                                           docket_cli) -> None:
    """A shared cache with links at the files a pull writes (the blob, its bitfield, its lock): ctorrent and the
    HTTP fetch followed them and wrote outside --location. Now the links are removed and the pull works."""
    loc, outside = tmp_path / "loc", tmp_path / "outside"
    outside.mkdir()
    work = loc / "torrents" / tarball_registry.hex
    work.mkdir(parents=True)
    (loc / "blobs").mkdir()
    victims = {loc / "blobs" / tarball_registry.hex: outside / "blob-victim",
               work / f"{tarball_registry.hex}.bf": outside / "bf-victim",
               work / "lock": outside / "lock-victim", work / "ctorrent.log": outside / "log-victim"}
    for link, victim in victims.items():
        victim.write_bytes(b"precious\n")
        link.symlink_to(victim)
    for transport in ("http", "auto"):
        if transport == "auto":  # the links again, for ctorrent's own writes (-s, -b), then the HTTP fallback
            shutil.rmtree(loc)
            work.mkdir(parents=True)
            (loc / "blobs").mkdir()
            for link, victim in victims.items():
                link.symlink_to(victim)
        res = docket_cli(*tarball_registry.args(loc, "--timeout", "5", "pull", "--no-load", "--transport",
                                                transport, "--fallback-after", "1", "--seed-time", "0",
                                                "evil:latest"), check=False, timeout=90)
        assert res.returncode == 0, (transport, res.stderr)
        assert all(v.read_bytes() == b"precious\n" for v in victims.values()), (transport, res.stderr)
        assert sorted(p.name for p in outside.iterdir()) == sorted(v.name for v in victims.values())
    assert (loc / "blobs" / tarball_registry.hex).read_bytes() == tarball_registry.blob
    assert not (loc / "blobs" / tarball_registry.hex).is_symlink()
    record("client: cache", "symbolic links planted at the blob, bitfield, lock and log files in --location",
           "the links removed before any write, the victims outside untouched, the pull completes; "
           "before: the HTTP fetch and ctorrent wrote through them")


def test_a_linked_cache_directory_is_refused(tarball_registry: TarballRegistry, tmp_path: Path, docket_cli) -> None:
    loc, outside = tmp_path / "loc", tmp_path / "outside"
    loc.mkdir()
    outside.mkdir()
    (loc / "blobs").symlink_to(outside)
    res = docket_cli(*tarball_registry.args(loc, "pull", "--no-load", "--transport", "http", "evil:latest"),
                     check=False, timeout=60)
    assert res.returncode != 0 and "is a symbolic link" in res.stderr, res.stderr
    assert list(outside.iterdir()) == []
    (loc / "blobs").unlink()
    (loc / "torrents").symlink_to(outside)
    res = docket_cli(*tarball_registry.args(loc, "pull", "--no-load", "--transport", "http", "evil:latest"),
                     check=False, timeout=60)
    assert res.returncode != 0 and "is a symbolic link" in res.stderr, res.stderr
    assert list(outside.iterdir()) == []
    record("client: cache", "--location/blobs or --location/torrents a symbolic link to another directory",
           f"exit {res.returncode}: '... is a symbolic link: docket writes nothing through links in its cache', "
           "nothing written there")


def test_output_edge_cases(tarball_registry: TarballRegistry, tmp_path: Path, docket_cli) -> None:
    """-o at a fifo (or a device such as /dev/null, as root) would be replaced by the tarball: refused up front.
    A symbolic link at -o is replaced itself (its target untouched); a directory is refused."""
    loc = tmp_path / "loc"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    res = docket_cli(*tarball_registry.args(loc, "pull", "--no-load", "-o", str(fifo), "evil:latest"),
                     check=False, timeout=60)
    assert res.returncode == 2 and "not a regular file" in res.stderr, res.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and tarball_registry.seen == []
    res = docket_cli(*tarball_registry.args(loc, "pull", "--no-load", "-o", str(tmp_path), "evil:latest"),
                     check=False, timeout=60)
    assert res.returncode == 2 and "is a directory" in res.stderr, res.stderr
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    link = tmp_path / "out.tar"
    link.symlink_to(target)
    docket_cli(*tarball_registry.args(loc, "pull", "--no-load", "--transport", "http", "-o", str(link),
                                      "evil:latest"), timeout=60)
    assert target.read_bytes() == b"keep" and not link.is_symlink()
    with tarfile.open(link) as tar:  # the docker load tarball, its one layer the blob
        assert tar.extractfile(next(m for m in tar if m.name.endswith("layer.tar"))).read() == tarball_registry.blob
    record("client: -o", "-o at a fifo or device, at a directory, at a symbolic link",
           "fifo/device: exit 2 before any request (before: replaced by the tarball); directory: exit 2; "
           "a link: the link replaced, its target untouched")


# -- remote text in narrative lines ---------------------------------------------------------------------------------

def test_an_announce_url_with_escape_sequences_is_refused(tarball_registry: TarballRegistry, tmp_path: Path,
                                                          docket_cli) -> None:
    """The .torrent's announce URL reached the warning 'the tracker URL is unreachable' and the result line
    unescaped: a torrent whose announce holds control characters is refused (exit 6) and nothing is downloaded."""
    from docket.torrent.metainfo import read_torrent

    torrent_path = f"/api/v1/blobs/sha256:{tarball_registry.hex}/torrent"
    good = read_torrent(tarball_registry_torrent(tarball_registry)).announce.encode()
    evil = good + b"\x1b[2J\x1b]0;pwned\x07"
    raw = tarball_registry_torrent(tarball_registry).replace(b"%d:%s" % (len(good), good),
                                                              b"%d:%s" % (len(evil), evil))
    with pytest.raises(Exception, match="control, space or non-ASCII"):
        read_torrent(raw)
    tarball_registry.routes[torrent_path] = raw
    res = docket_cli(*tarball_registry.args(tmp_path / "loc", "pull", "--no-load", "evil:latest"), check=False,
                     timeout=60)
    assert res.returncode == 6, res.stderr
    assert "\x1b" not in res.stderr + res.stdout and "\x07" not in res.stderr + res.stdout
    assert f"/api/v1/blobs/sha256:{tarball_registry.hex}" not in tarball_registry.seen
    record("client: terminal", "escape sequences in a .torrent's announce URL (printed in warnings and results)",
           "exit 6 'torrent announce URL has control, space or non-ASCII characters', no blob request")


def tarball_registry_torrent(server: TarballRegistry) -> bytes:
    return server.routes[f"/api/v1/blobs/sha256:{server.hex}/torrent"]


def test_reporter_lines_escape_remote_text() -> None:
    """Every narrative line (info, warning, task) goes through printable: a future message that quotes remote
    text cannot reach the terminal raw."""
    import io

    from docket.client.progress import PlainReporter

    buf = io.StringIO()
    rep = PlainReporter(buf)
    rep.info("line one\nfrom remote: \x1b[2J\rPulled and loaded")
    rep.warning("tracker \x1b]0;t\x07 down")
    with rep.task("Downloading \x1b[8m", 10) as task:
        task.update(10)
    text = buf.getvalue()
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    assert text.startswith("line one\nfrom remote: \\x1b[2J\\x0dPulled")
    record("client: terminal", "control characters in any info/warning/progress line of the reporter",
           "escaped line by line (our own newlines kept)")


# -- docket-tracker against a hostile registry ------------------------------------------------------------------

def _chunked_trickle(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    while not stop.wait(0.5):
        conn.sendall(b"29\r\n" + b"a" * 40 + b"\n\r\n")


def _close_delimited_then_silent(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\n" + b"b" * 40 + b"\n")
    stop.wait(30)  # the rest of the list never comes


def _broken_chunks(conn: socket.socket, stop: threading.Event) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot a chunk\r\n")


@pytest.mark.parametrize("serve,expect", [
    pytest.param(_chunked_trickle, "within 2s", id="chunked-trickle"),
    pytest.param(_close_delimited_then_silent, "within 2s", id="close-delimited-cut"),
    pytest.param(_broken_chunks, "cannot reach the registry", id="broken-chunks"),
])
def test_a_hostile_whitelist_is_a_docket_error_not_a_crash(serve, expect: str) -> None:
    """docket-tracker's follower keeps its whitelist on a DocketError only: a body cut or broken under the raw
    reads raised urllib3's ProtocolError (docket-tracker died with a traceback), and a close-delimited reply cut
    at the deadline was taken for a complete (partial) whitelist."""
    from docket.errors import DocketError
    from docket.tracker_cli import fetch_whitelist

    with raw_server(serve) as server, DeadlineSession(2.0) as session:
        t0 = time.monotonic()
        with pytest.raises(DocketError, match=expect):
            fetch_whitelist(session, f"http://127.0.0.1:{server.port}", timeout=5, deadline=2.0)
        took = time.monotonic() - t0
    assert took < 4.0, took
    record("docket-tracker", f"registry whitelist: {serve.__name__.strip('_').replace('_', ' ')}",
           f"a DocketError after {took:.1f} s ('{expect}'), the current whitelist kept; before: urllib3 "
           "ProtocolError (the tracker program died) or a partial list taken")


# -- a peer that serves corrupt pieces --------------------------------------------------------------------------------

def test_a_peer_serving_corrupt_pieces_is_never_loaded(tmp_path: Path, docket_cli) -> None:
    """The only BitTorrent peer seeds a file of the right size with flipped bytes (ctorrent -f skips its own
    check). ctorrent drops every piece that fails its SHA-1; with --transport p2p the pull ends with an error and
    nothing verified; with the default transport the layer comes over HTTP from the registry and verifies."""
    from tests.support.procs import free_port
    from docket.torrent import Opentracker
    from docket.torrent.ctorrent import CtorrentProcess

    tracker = Opentracker("127.0.0.1", free_port(), tmp_path / "tracker")
    server = TarballRegistry(tmp_path / "reg", announce=tracker.announce_url)
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(b ^ 0xFF for b in server.blob))
    try:
        tracker.start([server.info_hash])
        torrent = tmp_path / "seed.torrent"
        torrent.write_bytes(tarball_registry_torrent(server))
        with CtorrentProcess(torrent, bad, workdir=tmp_path / "seedw", listen_ip="127.0.0.74", seed_only=True):
            loc = tmp_path / "loc"
            res = docket_cli(*server.args(loc, "pull", "--no-load", "--transport", "p2p", "--stall-timeout", "4",
                                          "--seed-time", "0", "evil:latest"), check=False, timeout=90,
                             env={"DOCKET_PEER_IP": "127.0.0.75"})
            assert res.returncode != 0, res.stderr
            assert "hash check failed" in res.stderr  # the peer was reached and its pieces refused
            assert "Downloaded and verified" not in res.stdout
            blob = loc / "blobs" / server.hex
            assert not blob.exists() or blob.read_bytes() != bad.read_bytes()
            p2p_exit = res.returncode
            res = docket_cli(*server.args(loc, "pull", "--no-load", "--fallback-after", "2", "--seed-time", "0",
                                          "evil:latest"), check=False, timeout=90,
                             env={"DOCKET_PEER_IP": "127.0.0.75"})
            assert res.returncode == 0, res.stderr
            assert blob.read_bytes() == server.blob
    finally:
        tracker.stop()
        server.close()
    record("client: peers", "the only peer seeds a same-size file with every byte flipped",
           f"--transport p2p: exit {p2p_exit}, nothing verified; default transport: over HTTP from the registry, "
           "verified")


def test_log_lines_escape_remote_text(tmp_path: Path) -> None:
    """With -v the client logs what ctorrent, trackers and registries said: the log lines are escaped too."""
    code = ("import logging, sys\n"
            "from docket.client.cli import main\n"
            "sys.argv = ['docket', '-vv', '--location', sys.argv[1], 'images']\n"
            "import docket.client.api as api\n"
            "api.RegistryClient.list_images = lambda self: logging.getLogger('x').warning("
            "'remote said %s', '\\x1b[2J\\x1b]0;t\\x07\\rfake') or []\n"
            "main()\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "loc")], capture_output=True, text=True,
                         timeout=60)
    assert "remote said" in res.stderr, res.stderr
    assert "\x1b" not in res.stderr and "\x07" not in res.stderr and "\r" not in res.stderr
    record("client: terminal", "control characters in a log line (-v: ctorrent output, tracker and registry text)",
           "escaped by the log formatter")


@pytest.mark.parametrize("entries,expect", [
    pytest.param(20_000_000, "more than 1000000 objects and arrays", id="60MiB-of-empty-objects"),
    pytest.param(150_000, "lists 150000 images, more than 100000", id="150k-images"),
])
def test_a_listing_of_millions_of_tiny_entries_is_refused(tmp_path: Path, docket_cli, entries: int,
                                                          expect: str) -> None:
    """Within the 64 MiB byte cap, '{},' x 20 million took 1.8 GB to parse and `docket images` then drew a
    row per entry (7 GB, minutes): counted before parsing and after, refused (exit 6)."""
    body = b'{"images":[' + b"{}," * (entries - 1) + b"{}]}"

    def serve(conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)

    with raw_server(serve) as server:
        t0 = time.monotonic()
        res = docket_cli("--host", "http://127.0.0.1", "--port", str(server.port), "images", check=False,
                         timeout=120, location=tmp_path / "loc")
        took = time.monotonic() - t0
    assert res.returncode == 6 and expect in res.stderr, res.stderr
    assert res.stdout == "" and took < 20, took
    record("client: sizes", f"`docket images`: a listing of {entries:,} empty objects ({len(body) >> 20} MiB)",
           f"exit 6 after {took:.1f} s ('{expect}'); before: 1.8 GB to parse, a row each")


def test_a_deeply_nested_error_body_is_a_registry_error_not_a_crash() -> None:
    """An error answer is parsed by the strict parser too: 60,000 brackets made json.loads raise RecursionError
    ("unexpected RecursionError", exit 1) instead of reporting the registry's HTTP error."""
    from docket import errors
    from docket.client.api import _error_from_response

    resp = requests.models.Response()
    resp.status_code = 500
    resp._content = b"[" * 60_000
    err = _error_from_response(resp, "listing images")
    assert type(err) is errors.DocketError and "HTTP 500" in str(err)
    resp.status_code, resp._content = 404, b'{"error":{"code":"NOT_FOUND","message":"no such tag","hint":"h"}}'
    assert isinstance(_error_from_response(resp, "pulling"), errors.NotFound)
    record("client", "error answer of 60,000 nested brackets", "reported as the registry's HTTP 500, no "
                                                               "RecursionError; a well-formed error still maps by code")
