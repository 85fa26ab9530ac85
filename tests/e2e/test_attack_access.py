"""Attacks on a registry with read tokens by someone who holds no token but reaches every port: the registry's
HTTP routes, the managed tracker (stats in every mode, full scrape, announce) and the seeders' peer wire.

Real docket-registry processes (managed opentracker behind its guard, ctorrent seeders), raw sockets for the
attacker, and a real `docket pull` through BitTorrent for the token holder (README "Access control and HTTPS").
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests


from docket.torrent.metainfo import build_torrent, read_torrent
from docket.torrent.tracker import scrape
from tests.support.image_factory import ImageFactory
from tests.support.procs import free_port, wait_until
from tests.support.registry_server import RegistryServer
from tests.support.robustness_rows import record
from tests.support.tools import need

PUSH, READ = "push-token-access-0123456789", "read-token-access-0123456789"
ATTACKER_IP = "127.0.0.9"  # not the registry's address: opentracker's -A admin address would be 127.0.0.1
STATS_MODES = ["peer", "conn", "scrp", "udp4", "tcp4", "busy", "torr", "fscr", "s24s", "tpbs", "herr", "completed",
               "top100", "top10", "renew", "syncs", "version", "everything", "statedump", "fulllog", "woodpeckers",
               "numwants"]
FORMATS = ["", "&format=txt", "&format=bin", "&format=url", "&format=ben"]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Private:
    """A registry with read tokens, one layer blob pushed, and what a token holder can know about it."""

    server: RegistryServer
    digest: str
    content: bytes
    info_hash: str
    seeder_ports: list[int] = field(default_factory=list)

    @property
    def secrets(self) -> list[bytes]:
        """Byte strings no answer to a stranger may contain (the info hash in every spelling, the seeders' ports)."""
        raw = bytes.fromhex(self.info_hash)
        out = [raw, self.info_hash.encode(), self.info_hash.upper().encode(),
               urllib.parse.quote_from_bytes(raw).encode()]
        return out + [str(p).encode() for p in self.seeder_ports]


def start_registry(tmp: Path, *extra: str, location: Path | None = None,
                   tracker_port: int | None = None) -> RegistryServer:
    server = RegistryServer(location=location or tmp / "registry", port=free_port(),
                            tracker_port=tracker_port or free_port(), log=tmp / f"registry-{uuid.uuid4().hex[:6]}.log",
                            extra_args=["--gc-interval", "0", "--scrub-interval", "0", *extra])
    server.start()
    return server


def private_args() -> list[str]:
    return ["--auth-token", PUSH, "--read-token", READ]


def upload_layer(server: RegistryServer, content: bytes, token: str | None = PUSH) -> dict:
    resp = requests.post(f"{server.url}/api/v1/blobs?kind=layer", data=content,
                         headers={"Content-Type": "application/octet-stream", **(auth(token) if token else {})},
                         timeout=60)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()


def seeders(server: RegistryServer, token: str | None = READ) -> dict[str, dict]:
    body = requests.get(f"{server.url}/api/v1/seeders", headers=auth(token) if token else {}, timeout=10).json()
    return {s["digest"]: s for s in body["seeders"]}


def raw_http(host: str, port: int, target: str, source: str = ATTACKER_IP) -> tuple[int, bytes]:
    """One GET over a raw socket from ``source`` (requests cannot choose the source address)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((source, 0))
        s.settimeout(15)
        s.connect((host, port))
        s.sendall(f"GET {target} HTTP/1.0\r\nHost: {host}\r\nAccept-Encoding: gzip\r\n\r\n".encode())
        data = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body


def announce_query(info_hash: str, port: int = 6881, left: int = 0) -> str:
    peer_id = b"-XX0001-" + uuid.uuid4().hex[:12].encode()
    return urllib.parse.urlencode({"info_hash": bytes.fromhex(info_hash), "peer_id": peer_id, "port": port,
                                   "uploaded": 0, "downloaded": 0, "left": left, "compact": 1},
                                  quote_via=urllib.parse.quote)


def handshake(port: int, host: str = "127.0.0.2", source: str = ATTACKER_IP) -> bytes:
    """Connect from ``source``, send nothing, and return what the seeder sends within 3 s."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((source, 0))
        s.settimeout(3)
        s.connect((host, port))
        data = bytearray()
        try:
            while len(data) < 68:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return bytes(data)


def fetch_block(port: int, info_hash: str, pieces: int, host: str = "127.0.0.2", source: str = ATTACKER_IP,
                deadline: float = 20.0) -> bytes | None:
    """Be a leecher on the peer wire: handshake for ``info_hash``, an empty bitfield, "interested", then request
    the first 16 KiB block once unchoked. The block, or None when the seeder closes or never serves it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((source, 0))
        s.settimeout(deadline)
        s.connect((host, port))
        end = time.monotonic() + deadline
        buf = bytearray()

        def need(n: int) -> None:
            while len(buf) < n:
                s.settimeout(max(0.1, end - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    raise EOFError
                buf.extend(chunk)

        try:
            s.sendall(b"\x13BitTorrent protocol" + bytes(8) + bytes.fromhex(info_hash) + b"-XX0001-" + os.urandom(12))
            need(68)
            if buf[28:48] != bytes.fromhex(info_hash):
                return None
            del buf[:68]
            s.sendall(struct.pack(">IB", 1 + -(-pieces // 8), 5) + bytes(-(-pieces // 8)))  # bitfield: nothing
            s.sendall(struct.pack(">IB", 1, 2))  # interested
            while time.monotonic() < end:
                need(4)
                n = struct.unpack(">I", buf[:4])[0]
                need(4 + n)
                msg = bytes(buf[4:4 + n])
                del buf[:4 + n]
                if msg[:1] == b"\x01":  # unchoke
                    s.sendall(struct.pack(">IBIII", 13, 6, 0, 0, 16384))
                elif msg[:1] == b"\x07":  # piece
                    return msg[9:]
        except (EOFError, TimeoutError, OSError):
            return None
    return None


def public_info_hash(content: bytes, digest: str, tmp: Path) -> str:
    """The info hash anyone holding the layer's bytes would compute with docket's own torrent builder."""
    blob = tmp / f"blob-{uuid.uuid4().hex}"
    blob.write_bytes(content)
    meta = build_torrent(blob, "http://127.0.0.1:1/announce", out=tmp / f"{blob.name}.torrent",
                         name=f"{digest.split(':', 1)[1]}.tar")
    return meta.info_hash


@pytest.fixture(scope="module")
def private(tmp_path_factory) -> Iterator[Private]:
    need("ctorrent")
    need("opentracker")
    tmp = tmp_path_factory.mktemp("access")
    server = start_registry(tmp, *private_args())
    try:
        content = os.urandom(700 * 1024)
        answer = upload_layer(server, content)
        digest = answer["digest"]
        torrent = requests.get(f"{server.url}/api/v1/blobs/{digest}/torrent", headers=auth(READ), timeout=10)
        meta = read_torrent(torrent.content)
        assert meta.info_hash == answer["info_hash"]
        ports = wait_until(lambda: [s["listen_port"] for s in seeders(server).values() if s["listen_port"]],
                           timeout=30, what="seeder listening")
        yield Private(server, digest, content, meta.info_hash, ports)
    finally:
        server.stop()


def tracker_answers(p: Private) -> dict[str, tuple[int, bytes]]:
    """Everything a stranger asks the tracker port that could list torrents, from two source addresses."""
    targets = [f"/stats?mode={m}{f}" for m in STATS_MODES for f in FORMATS]
    targets += ["/stats", "/scrape", "//scrape", "/%73crape", "/scrape?", "/scrape?x=1", "/announce", "/a",
                "/stats?mode=tpbs&format=txt&gzip", "/", "/announce?info_hash=", "/scrape%20HTTP/1.0"]
    out = {}
    for source in (ATTACKER_IP, "127.0.0.1"):  # 127.0.0.1 is the registry's own (formerly admin) address
        for target in targets:
            out[f"{source} {target}"] = raw_http("127.0.0.1", p.server.tracker_port, target, source)
    return out


def test_tracker_stats_and_full_scrape_reveal_no_info_hash(private: Private):
    answers = tracker_answers(private)
    for what, (status, body) in answers.items():
        assert status in (400, 404), (what, status, body[:200])
        for secret in private.secrets:
            assert secret not in body, (what, body[:200])
    # the same port still serves a token holder's scrape (the guard passes it): the probe above could have failed
    result = scrape(f"http://127.0.0.1:{private.server.tracker_port}/announce", private.info_hash)
    assert result.complete >= 1
    record("access", f"tracker stats ({len(STATS_MODES)} modes x {len(FORMATS)} formats) and full scrape "
           "(/scrape, //scrape, %73crape) without a token, read-token registry",
           f"{len(answers)} requests from 2 addresses: all 400/404, no info hash or seeder port in any answer")


def test_announce_with_a_hash_computed_from_the_content_is_refused(private: Private, tmp_path: Path):
    public = public_info_hash(private.content, private.digest, tmp_path)
    assert public != private.info_hash  # the registry's secret is in the info dict
    status, body = raw_http("127.0.0.1", private.server.tracker_port, f"/announce?{announce_query(public)}")
    assert status == 200 and b"not authorized" in body and b"peers" not in body, body
    status, body = raw_http("127.0.0.1", private.server.tracker_port, f"/announce?{announce_query(private.info_hash)}")
    assert status == 200 and b"5:peers" in body  # the true hash (a token holder's) is answered with the seeder
    record("access", "announce with the info hash computed from a layer's bytes (no token)",
           "refused: 'not authorized' (the torrent carries a per-blob secret); the true hash gets the seeders")


def test_peer_wire_with_a_computed_hash_gets_no_piece(private: Private, tmp_path: Path):
    public = public_info_hash(private.content, private.digest, tmp_path)
    pieces = read_torrent(requests.get(f"{private.server.url}/api/v1/blobs/{private.digest}/torrent",
                                       headers=auth(READ), timeout=10).content).pieces
    for port in private.seeder_ports:
        assert fetch_block(port, public, pieces) is None
        # control: the true hash (a token holder's) is served the layer's bytes on the same port
        assert fetch_block(port, private.info_hash, pieces, source="127.0.0.10") == private.content[:16384]
    record("access", "peer-wire request to the seeder with the info hash computed from the layer's bytes",
           "closed at the handshake: no piece; the true hash on the same port gets the layer's first block")


def test_a_seeder_port_tells_its_info_hash_to_whoever_connects(private: Private):
    """The limit README "Access control and HTTPS" states: ctorrent sends its handshake (with the info hash) as
    soon as a connection is accepted, before reading the other side's. Whoever reaches a seeder port can learn
    that torrent's hash and download it, so seeders must listen only on the fleet's network (--seed-address)."""
    port = private.seeder_ports[0]
    told = wait_until(lambda: handshake(port, source="127.0.0.11")[28:48], timeout=10, what="ctorrent's handshake")
    assert told == bytes.fromhex(private.info_hash)
    status, body = raw_http("127.0.0.1", private.server.tracker_port, f"/announce?{announce_query(told.hex())}")
    assert status == 200 and b"5:peers" in body  # with the learnt hash the tracker lists the seeders
    record("access", "stranger connects to a seeder port and sends nothing (known limit of ctorrent)",
           "ctorrent sends its handshake first: that torrent's info hash leaks, and with it the layer; "
           "hence seeders belong on a private network (--seed-address)")


def _openapi_gets(p: Private) -> list[str]:
    doc = requests.get(f"{p.server.url}/openapi.json", timeout=10).json()
    values = {"repository": "app", "tag": "v1", "digest": p.digest, "name": "app", "reference": "v1",
              "uuid": str(uuid.uuid4()), "host_id": "web01"}
    paths = []
    for path, ops in doc["paths"].items():
        if "get" in ops:
            paths.append(re.sub(r"\{(\w+)\}", lambda m: values[m.group(1)], path))
    return paths


def test_registry_routes_reveal_nothing_without_a_token(private: Private):
    paths = _openapi_gets(private)
    assert f"/api/v1/blobs/{private.digest}/torrent" in paths and "/api/v1/tracker/whitelist" in paths
    for path in paths:
        for headers in ({}, auth("not-a-token"), {"Authorization": "Basic " + "eDp5"}):
            resp = requests.get(f"{private.server.url}{path}", headers=headers, timeout=10)
            if path not in ("/healthz", "/openapi.json"):
                assert resp.status_code == 401, (path, resp.status_code)
            for secret in private.secrets:
                assert secret not in resp.content, (path, resp.content[:300])
                assert secret.decode("latin-1") not in str(resp.headers), (path, resp.headers)
        options = requests.options(f"{private.server.url}{path}", timeout=10)  # open to CORS preflights
        for secret in private.secrets:
            assert secret not in options.content and secret.decode("latin-1") not in str(options.headers), path
    health = requests.get(f"{private.server.url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    full = requests.get(f"{private.server.url}/healthz", headers=auth(READ), timeout=10).json()
    assert full["checks"]["seeders"]["seeders"][private.digest]["listen_port"] in private.seeder_ports
    assert full["checks"]["tracker"]["private"] is True
    record("access", f"every GET route of openapi.json ({len(paths)}) without, or with a wrong, token; OPTIONS",
           "401 except /healthz and /openapi.json; no info hash or seeder port in any body or header")
    record("access", "/healthz without a token on a read-token registry",
           "only {\"status\": \"ok\"}; the seeders' digests, pids and ports only with a read or push token")


def test_whitelist_route_needs_a_token(private: Private):
    resp = requests.get(f"{private.server.url}/api/v1/tracker/whitelist", timeout=10)
    assert resp.status_code == 401 and private.info_hash.encode() not in resp.content
    resp = requests.get(f"{private.server.url}/api/v1/tracker/whitelist", headers=auth(READ), timeout=10)
    assert resp.status_code == 200 and private.info_hash in resp.text.split()
    record("access", "GET /api/v1/tracker/whitelist without a token", "401; with a read token the list of hashes")


def test_upgrade_in_place_gives_existing_torrents_secret_hashes(tmp_path: Path):
    """An open registry's torrents (public hashes) get the secret when it restarts with read tokens; a restart
    keeps the hashes; deleting the secret file renews every hash (the way to revoke what former holders knew)."""
    need("ctorrent")
    need("opentracker")
    tracker_port = free_port()
    server = start_registry(tmp_path, tracker_port=tracker_port)
    location = server.location
    try:
        content = os.urandom(300 * 1024)
        answer = upload_layer(server, content, token=None)
        digest, open_hash = answer["digest"], answer["info_hash"]
        assert open_hash == public_info_hash(content, digest, tmp_path)  # open registries: unchanged
        status, _ = raw_http("127.0.0.1", tracker_port, "/scrape", "127.0.0.1")
        assert status == 200  # an open registry's tracker is as before (full scrape answered)
    finally:
        server.stop()

    hashes = []
    for step in ("read tokens", "restart", "secret deleted"):
        if step == "secret deleted":
            (location / "torrent-secret").unlink()
        server = start_registry(tmp_path, *private_args(), location=location, tracker_port=tracker_port)
        try:
            blob = requests.get(f"{server.url}/api/v1/tracker/whitelist", headers=auth(READ), timeout=10).text.split()
            torrent = requests.get(f"{server.url}/api/v1/blobs/{digest}/torrent", headers=auth(READ), timeout=10)
            meta = read_torrent(torrent.content)
            assert blob == [meta.info_hash] and torrent.headers["Docket-Info-Hash"] == meta.info_hash
            hashes.append(meta.info_hash)
            announce = f"http://127.0.0.1:{tracker_port}/announce"
            wait_until(lambda: scrape(announce, meta.info_hash).complete >= 1, timeout=30,
                       what="the seeder announcing the new hash")
            status, body = raw_http("127.0.0.1", tracker_port, f"/announce?{announce_query(open_hash)}")
            assert b"not authorized" in body  # the old, public hash is no longer tracked
        finally:
            server.stop()
    assert hashes[0] != open_hash and hashes[1] == hashes[0] and hashes[2] not in (hashes[0], open_hash)
    record("access", "open registry restarted with --read-token (upgrade in place); secret file deleted",
           "torrents rewritten without re-reading blobs: new secret hashes, old public hash refused; "
           "stable across restarts; deleting torrent-secret renews every hash")


@pytest.fixture
def image(docker_client, tmp_path: Path) -> Iterator[ImageFactory]:
    factory = ImageFactory(docker_client, tmp_path / "images")
    yield factory
    factory.cleanup()


def docket(*args: str, server: RegistryServer, token: str | None, location: Path, peer_ip: str,
           check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKET_TOKEN", "DOCKET_TOKEN_FILE")}
    env["DOCKET_PEER_IP"] = peer_ip
    if token:
        env["DOCKET_TOKEN"] = token
    cmd = [sys.executable, "-m", "docket.client.cli", "--host", "http://127.0.0.1", "--port", str(server.port),
           "--location", str(location), *args]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=300)
    if check:
        assert result.returncode == 0, f"{cmd}\n{result.stdout}\n{result.stderr}"
    return result


def test_token_holder_pulls_through_bittorrent(image: ImageFactory, tmp_path: Path):
    need("ctorrent")
    need("opentracker")
    server = start_registry(tmp_path, *private_args())
    try:
        ref, marker = image.build(data_mib=2)
        docket("push", ref, server=server, token=PUSH, location=tmp_path / "pusher", peer_ip="127.0.0.41")
        image.remove(ref)
        refused = docket("pull", ref, server=server, token=None, location=tmp_path / "stranger",
                         peer_ip="127.0.0.42", check=False)
        assert refused.returncode != 0 and "token" in refused.stderr.lower()
        out = docket("pull", "--json", "--transport", "p2p", "--seed-time", "0", ref, server=server, token=READ,
                     location=tmp_path / "holder", peer_ip="127.0.0.43")
        summary = json.loads(out.stdout)
        assert summary["bytes_from_http"] == 0 and summary["bytes_from_peers"] > 2 * 1024 * 1024, summary
        assert image.run(ref) == marker
    finally:
        server.stop()
    record("access", "docket pull with a read token from a read-token registry (guarded tracker, secret hashes)",
           f"pulled through BitTorrent ({summary['bytes_from_peers']} bytes from peers, 0 over HTTP); "
           "without a token: refused")


def test_guard_logic_unit():
    """The guard's pure parts: query filtering (no full scrape, no unknown parameters), the address map both ways,
    and the peer list rewritten from mapped to real addresses (unknown ones dropped)."""
    from docket.torrent.guard import AddressMap, bencode, filter_query, unmap_peers
    from docket.torrent.tracker import bdecode

    assert filter_query(b"info_hash=%AA&port=1&lognet=1.2.3.4&ip=9.9.9.9", frozenset({b"info_hash", b"port"})) \
        == b"info_hash=%AA&port=1"
    assert filter_query(b"", frozenset({b"info_hash"})) is None  # "/scrape?" must not become a full scrape
    assert filter_query(b"x=1 HTTP/1.0\r\n", frozenset({b"x"})) is None
    addresses = AddressMap()
    a, b = addresses.mapped("198.18.0.5"), addresses.mapped("10.0.0.7")
    assert a != b and a.startswith("127.") and addresses.mapped("198.18.0.5") == a and addresses.real(b) == "10.0.0.7"
    unknown = socket.inet_aton("127.99.0.1") + b"\x00\x01"  # an address the map never gave out
    peers = socket.inet_aton(a) + b"\x1a\xe1" + unknown + socket.inet_aton(b) + b"\x00\x02"
    reply = bdecode(unmap_peers(bencode({b"interval": 1800, b"peers": peers}), addresses))
    assert reply[b"peers"] == socket.inet_aton("198.18.0.5") + b"\x1a\xe1" + socket.inet_aton("10.0.0.7") + b"\x00\x02"
    failure = b"d14:failure reason63:Requested download is not authorized for use with this tracker.e"
    assert unmap_peers(failure, addresses) == failure
    small = AddressMap(ipaddress.IPv4Network("127.200.0.0/30"))  # two usable addresses
    first = small.mapped("1.1.1.1")
    small.mapped("2.2.2.2")
    assert small.mapped("3.3.3.3") == first and small.real(first) == "3.3.3.3" and len(small) == 2


def test_torrent_source_is_per_blob_and_secret(tmp_path: Path):
    from docket.registry.auth import torrent_secret, torrent_source

    secret = torrent_secret(tmp_path)
    assert torrent_secret(tmp_path) == secret and (tmp_path / "torrent-secret").stat().st_mode & 0o777 == 0o600
    one, two = torrent_source(secret, "sha256:" + "a" * 64), torrent_source(secret, "sha256:" + "b" * 64)
    assert one != two and one.startswith("docket-") and secret.hex() not in one
    (tmp_path / "torrent-secret").unlink()
    assert torrent_secret(tmp_path) != secret  # deleting the file renews every info hash


def test_guard_refuses_to_start_without_loopback(tmp_path: Path):
    """In a network namespace whose lo is down the guard could not reach its opentracker: a clear error at start
    (with the fix), not a tracker that answers every announce with 503."""
    need("ip")
    name = f"dkacc-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        code = ("import tempfile; from pathlib import Path; from docket.torrent.opentracker import Opentracker\n"
                "t = Opentracker('127.0.0.1', 6969, Path(tempfile.mkdtemp(dir=%r)), guarded=True)\n"
                "try:\n    t.start([])\nexcept Exception as e:\n    print(type(e).__name__, e.message, e.hint)\n"
                "else:\n    t.stop(); print('started')\n") % str(tmp_path)
        out = subprocess.run(["ip", "netns", "exec", name, sys.executable, "-c", code], capture_output=True,
                             text=True, timeout=60)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)
    assert out.stdout.startswith("ServiceUnavailable cannot run the tracker guard"), out.stdout + out.stderr
    assert "ip link set lo up" in out.stdout
    record("access", "guarded tracker started where the loopback interface is down (fresh network namespace)",
           "refused at start: 'cannot run the tracker guard ... is the lo interface up?' with the fix as hint")
