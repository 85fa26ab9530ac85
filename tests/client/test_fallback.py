"""`docket pull --transport auto|p2p|http`: HTTP fallback when the swarm gives nothing, resumed with Range from the
pieces already valid on disk, every digest still verified.

End-to-end tests drive a real docket-registry, ctorrent, dockerd; the tracker failures are real (a port nobody
listens on, or a tiny tracker that refuses every announce); the corrupting proxy is a real HTTP hop.
Unit tests cover the pure logic: piece checks, resume plans, gzip / sha512 layers (diff_id != digest).
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner

from docket import errors
from docket.client.cli import cli
from docket.client.digests import digest_file
from docket.client.http_fetch import piece_hashes, plan_resume
from docket.torrent.ctorrent_engine import CtorrentEngine
from docket.client.layers import chain_ids
from docket.client.records import LayeredRecord, check_config
from docket.reference import Reference
from docket.torrent.metainfo import build_torrent, choose_piece_size
from tests.support.fakes import (REF, FakeCtorrent, FakeDocker, FakeRegistry, FakeTorrentProc, layer_puller, layer_tar,
                                 make_puller, sha)
from tests.support.procs import free_port, port_open
from tests.support.registry_server import RegistryServer
from tests.support.tools import need

PIECE = 256 * 1024


# -- unit: pieces on disk, resume plans ------------------------------------------------------------------------

@pytest.fixture
def blob_and_torrent(tmp_path: Path) -> tuple[bytes, bytes]:
    data = os.urandom(5 * PIECE + 1000)  # 6 pieces, the last one short
    src = tmp_path / "blob"
    src.write_bytes(data)
    build_torrent(src, "http://127.0.0.1:1/announce", out=tmp_path / "t.torrent", piece_size=PIECE)
    return data, (tmp_path / "t.torrent").read_bytes()


def test_plan_resume_keeps_verified_pieces_and_coalesces_the_rest(tmp_path: Path, blob_and_torrent):
    data, torrent = blob_and_torrent
    hashes = piece_hashes(torrent)
    assert hashes is not None and len(hashes) == 6
    f = tmp_path / "partial"
    f.write_bytes(b"\0" * len(data))  # ctorrent preallocates: size says nothing
    assert plan_resume(f, len(data), PIECE, hashes).runs == ((0, len(data)),)
    # pieces 1, 2 and 4 valid: fetch 0, 3 and 5 (the short last piece)
    buf = bytearray(len(data))
    for i in (1, 2, 4):
        buf[i * PIECE:(i + 1) * PIECE] = data[i * PIECE:(i + 1) * PIECE]
    f.write_bytes(bytes(buf))
    plan = plan_resume(f, len(data), PIECE, hashes)
    assert plan.runs == ((0, PIECE), (3 * PIECE, 4 * PIECE), (5 * PIECE, len(data)))
    assert plan.valid == 3 * PIECE and plan.valid + plan.missing == len(data)
    # a short file (an interrupted HTTP transfer): the complete leading pieces count
    f.write_bytes(data[:2 * PIECE + 10])
    assert plan_resume(f, len(data), PIECE, hashes).runs == ((2 * PIECE, len(data)),)
    # no hashes, or none matching the piece count: nothing on disk is trusted
    assert plan_resume(f, len(data), PIECE, None).runs == ((0, len(data)),)
    assert plan_resume(f, len(data), PIECE, hashes[:-1]).runs == ((0, len(data)),)
    assert plan_resume(tmp_path / "absent", len(data), PIECE, hashes).valid == 0
    assert plan_resume(f, 0, PIECE, []).runs == ()
    assert piece_hashes(b"not bencode") is None


def test_digest_file_uses_the_algorithm_of_the_digest(tmp_path: Path):
    f = tmp_path / "x"
    f.write_bytes(b"abc" * 1000)
    assert digest_file(f) == "sha256:" + hashlib.sha256(b"abc" * 1000).hexdigest()
    assert digest_file(f, "sha512") == "sha512:" + hashlib.sha512(b"abc" * 1000).hexdigest()


# -- unit: diff_id / media_type / sha512 in records ------------------------------------------------------------

def _gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def test_record_diff_ids_drive_the_config_check_and_chain_ids():
    raw = [layer_tar({"a": b"A" * 3000}), layer_tar({"b": b"B" * 3000})]
    diff_ids = [sha(x) for x in raw]
    blob0 = _gz(raw[0])
    digest0 = "sha512:" + hashlib.sha512(blob0).hexdigest()
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    rec = {"image_id": sha(config), "digest": sha(b"m"), "size": 1 + len(config),
           "config": {"digest": sha(config), "size": len(config)},
           "layers": [{"digest": digest0, "diff_id": diff_ids[0], "size": len(blob0), "info_hash": "a" * 40,
                       "media_type": "application/vnd.docker.image.rootfs.diff.tar.gzip"},
                      {"digest": diff_ids[1], "size": len(raw[1]), "info_hash": "b" * 40}]}
    r = LayeredRecord.from_json(Reference("team/app", "v1"), rec)
    assert [layer.diff_id for layer in r.layers] == diff_ids  # absent diff_id = digest
    assert r.layers[0].hex == digest0.split(":")[1] and len(r.layers[0].hex) == 128
    assert r.layers[0].media_type.endswith("gzip") and r.layers[1].media_type is None
    assert check_config(r, config) == diff_ids
    bad = dict(rec, layers=[dict(rec["layers"][0], diff_id="sha256:xyz"), rec["layers"][1]])
    with pytest.raises(errors.IntegrityError, match="diff_id"):
        LayeredRecord.from_json(Reference("team/app", "v1"), bad)
    swapped = dict(rec, layers=[dict(rec["layers"][0], diff_id=diff_ids[1]), rec["layers"][1]])
    with pytest.raises(errors.IntegrityError, match="other layers"):
        check_config(LayeredRecord.from_json(Reference("team/app", "v1"), swapped), config)


def test_record_allows_an_empty_layer_without_torrent_and_no_layers_at_all():
    """A 0-byte layer (OCI tools make them) has no torrent on the registry: info_hash null is fine for it only."""
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [sha(b"")]}}).encode()
    rec = {"image_id": sha(config), "digest": sha(b"m"), "size": len(config),
           "config": {"digest": sha(config), "size": len(config)},
           "layers": [{"digest": sha(b""), "size": 0, "info_hash": None, "torrent_url": None}]}
    r = LayeredRecord.from_json(Reference("team/app", "v1"), rec)
    assert r.layers[0].size == 0 and check_config(r, config) == [sha(b"")]
    with pytest.raises(errors.IntegrityError, match="info_hash"):
        LayeredRecord.from_json(Reference("team/app", "v1"),
                                dict(rec, layers=[{"digest": sha(b"x"), "size": 1, "info_hash": None}]))
    bare = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}}).encode()
    none = dict(rec, image_id=sha(bare), config={"digest": sha(bare), "size": len(bare)}, layers=[], size=len(bare))
    assert check_config(LayeredRecord.from_json(Reference("team/app", "v1"), none), bare) == []


def _serve_gzip_image(reg: FakeRegistry, tmp_path: Path) -> tuple[list[str], list[bytes], list[str]]:
    """An image whose layers are a gzip blob (sha256 digest), a gzip blob (sha512 digest) and a plain tar."""
    raw = [layer_tar({"base": os.urandom(40_000)}), layer_tar({"mid": os.urandom(30_000)}),
           layer_tar({"app": os.urandom(2_000)})]
    diff_ids = [sha(x) for x in raw]
    blobs = [_gz(raw[0]), _gz(raw[1]), raw[2]]
    digests = [sha(blobs[0]), "sha512:" + hashlib.sha512(blobs[1]).hexdigest(), diff_ids[2]]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    reg.blobs[sha(config)] = config
    entries = []
    for d, diff_id, data in zip(digests, diff_ids, blobs):
        f = tmp_path / "src" / d.split(":")[1]
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(data)
        meta = build_torrent(f, "http://127.0.0.1:1/announce", out=tmp_path / "src" / f"{f.name}.torrent",
                             piece_size=16 * 1024)
        reg.extra[f"/api/v1/blobs/{d}/torrent"] = (tmp_path / "src" / f"{f.name}.torrent").read_bytes()
        reg.blobs[d] = data
        entry = {"digest": d, "size": len(data), "info_hash": meta.info_hash, "piece_length": meta.piece_length}
        if d != diff_id:
            entry.update(diff_id=diff_id, media_type="application/vnd.docker.image.rootfs.diff.tar.gzip")
        entries.append(entry)
    rec = {"repository": "team/app", "tag": "v1", "ref": "team/app:v1", "image_id": sha(config), "format": "layers",
           "digest": sha(b"manifest"), "size": len(config) + sum(map(len, blobs)),
           "config": {"digest": sha(config), "size": len(config)}, "layers": entries}
    reg.extra["/api/v1/repositories/team/app/tags/v1"] = json.dumps(rec).encode()
    return digests, blobs, diff_ids


def test_gzip_and_sha512_layers_fetched_by_digest_loaded_by_diff_id(fake_registry, tmp_path: Path):
    """transport http against a server that ignores Range: chain ids from diff_ids, blobs verified by digest
    (sha512 too), the compressed bytes become layer.tar under the diff_id's directory."""
    digests, blobs, diff_ids = _serve_gzip_image(fake_registry, tmp_path)
    FakeTorrentProc.instances.clear()
    docker = FakeDocker(set(chain_ids(diff_ids[:1])))  # the base layer is already in Docker
    loc = tmp_path / "loc" / "blobs"
    loc.mkdir(parents=True)
    (loc / digests[1].split(":")[1]).write_bytes(blobs[1][:20_000])  # an interrupted HTTP transfer
    res = layer_puller(fake_registry, tmp_path, {}, docker, transport="http", seed_time=0).pull(
        Reference("team/app", "v1"))
    s = res.summary()
    assert s["transport"] == "http" and s["layers_downloaded"] == 2 and s["layers_present"] == 1
    assert s["bytes_from_peers"] == 0
    mid = next(t for t in s["layer_transfers"] if t["digest"] == digests[1])
    assert mid["bytes_resumed"] == 16 * 1024 and mid["bytes_from_http"] == len(blobs[1]) - 16 * 1024
    assert s["bytes_from_http"] == mid["bytes_from_http"] + len(blobs[2])
    assert not FakeTorrentProc.instances  # no ctorrent in http mode
    with tarfile.open(fileobj=io.BytesIO(docker.loaded), mode="r:") as t:
        manifest = json.loads(t.extractfile("manifest.json").read())
        assert manifest[0]["Layers"] == [f"{d.split(':')[1]}/layer.tar" for d in diff_ids]
        assert t.extractfile(f"{diff_ids[1].split(':')[1]}/layer.tar").read() == blobs[1]  # still gzip
        assert t.extractfile(f"{diff_ids[2].split(':')[1]}/layer.tar").read() == blobs[2]
        assert f"{diff_ids[0].split(':')[1]}/layer.tar" not in t.getnames()  # present: not sent


def test_http_bytes_that_do_not_match_are_refused(fake_registry, tmp_path: Path):
    digests, blobs, _ = _serve_gzip_image(fake_registry, tmp_path)
    fake_registry.blobs[digests[2]] = b"x" + blobs[2][1:]
    with pytest.raises(errors.IntegrityError, match="digest"):
        layer_puller(fake_registry, tmp_path, {}, None, load=False, output=tmp_path / "o.tar", transport="http",
                     seed_time=0).pull(Reference("team/app", "v1"))


class _StuckTorrent(FakeTorrentProc):
    """A ctorrent that never gets a piece (the swarm gives nothing)."""

    def start(self) -> None:
        self._alive = True
        self.stopped = False

    def stop(self, timeout: float = 5.0) -> None:
        self._alive = False
        self.stopped = True


def test_auto_falls_back_per_layer_after_no_progress(fake_registry, tmp_path: Path):
    digests, blobs, diff_ids = _serve_gzip_image(fake_registry, tmp_path)
    from docket.client.pull import Puller, PullOptions
    from docket.client.api import RegistryClient

    opts = PullOptions(location=tmp_path / "loc", poll_interval=0.02, fallback_after=0.3, seed_time=0, load=False,
                       output=tmp_path / "o.tar")
    FakeTorrentProc.instances.clear()
    puller = Puller(RegistryClient("127.0.0.1", fake_registry.port), None, opts,
                    engine=CtorrentEngine(process_factory=lambda **kw: _StuckTorrent({Path(kw["save_as"]).name: b""},
                                                                                     **kw)),
                    scraper=lambda url, ih: type("S", (), {"incomplete": 0, "complete": 0})())
    s = puller.pull(Reference("team/app", "v1")).summary()
    assert s["transport"] == "http" and s["layers_over_http"] == 3
    assert "no progress from the swarm" in s["fallback_reason"]
    assert all(p.stopped for p in FakeTorrentProc.instances) and len(FakeTorrentProc.instances) == 3


def test_transport_options_refuse_bad_values():
    runner = CliRunner()
    bad = runner.invoke(cli, ["pull", "--transport", "foo", "x:y"])
    assert bad.exit_code == 2 and "Invalid value for '--transport'" in bad.output
    neg = runner.invoke(cli, ["pull", "--fallback-after", "-1", "x:y"])
    assert neg.exit_code == 2 and "--fallback-after" in neg.output
    env = runner.invoke(cli, ["pull", "x:y"], env={"DOCKET_TRANSPORT": "carrier-pigeon"})
    assert env.exit_code == 2 and "carrier-pigeon" in env.output
    helptext = runner.invoke(cli, ["pull", "--help"]).output
    assert "DOCKET_TRANSPORT" in helptext and "DOCKET_FALLBACK_AFTER" in helptext


# -- end to end --------------------------------------------------------------------------------------------------

class NoHealthRegistry(RegistryServer):
    """A registry whose external tracker is down or refuses: /healthz is 503 by design, so wait for the port."""

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"registry exited with {self.proc.returncode}")
        return port_open("127.0.0.1", self.port)


@pytest.fixture
def dead_tracker_registry(tmp_path: Path) -> Iterator[tuple[RegistryServer, str]]:
    need("ctorrent")
    dead = free_port()
    server = NoHealthRegistry(location=tmp_path / "reg", port=free_port(), tracker_port=free_port(),
                              log=tmp_path / "reg.log", extra_args=["--tracker", f"127.0.0.1:{dead}"])
    server.start()
    try:
        yield server, f"127.0.0.1:{dead}"
    finally:
        server.stop()


def _summary(proc) -> dict[str, Any]:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ctorrent_logs(location: Path) -> list[Path]:
    return list((location / "torrents").glob("*/ctorrent.log")) if (location / "torrents").exists() else []


def _record(server: RegistryServer, ref: str) -> dict[str, Any]:
    repo, tag = ref.rsplit(":", 1)
    return requests.get(f"{server.url}/api/v1/repositories/{repo}/tags/{tag}", timeout=10).json()


@pytest.mark.e2e
def test_auto_pull_with_tracker_down_goes_over_http(dead_tracker_registry, image_factory, docket_cli,
                                                    tmp_path: Path):
    server, tracker = dead_tracker_registry
    ref, marker = image_factory.build(data_mib=1)
    docket_cli("push", ref, registry=server)
    image_factory.remove(ref)
    location = tmp_path / "auto"
    pull = docket_cli("pull", "--json", "--fallback-after", "3", "--seed-time", "0", ref, registry=server,
                      location=location, peer_ip="127.0.0.61", timeout=120)
    s = _summary(pull)
    assert "Warning" in pull.stderr and tracker in pull.stderr and "over HTTP" in pull.stderr
    assert s["loaded"] and s["transport"] == "http" and s["transport_requested"] == "auto"
    downloaded = s["bytes"] - _record(server, ref)["config"]["size"] - s["bytes_present"] - s["bytes_cached"]
    assert s["bytes_from_peers"] == 0 and s["bytes_from_http"] == downloaded > 0
    assert tracker in s["fallback_reason"]
    assert not _ctorrent_logs(location)  # the tracker was down: no ctorrent started
    assert image_factory.run(ref) == marker


@pytest.mark.e2e
def test_p2p_pull_with_tracker_down_fails_and_changes_nothing(dead_tracker_registry, image_factory, docket_cli):
    server, tracker = dead_tracker_registry
    ref, _ = image_factory.build(data_mib=1)
    docket_cli("push", ref, registry=server)
    image_factory.remove(ref)
    pull = docket_cli("pull", "--transport", "p2p", "--stall-timeout", "4", "--seed-time", "0", ref,
                      registry=server, peer_ip="127.0.0.62", check=False, timeout=120)
    assert pull.returncode == 9, pull.stderr
    assert tracker in pull.stderr and "no download progress" in pull.stderr
    assert "over HTTP" not in pull.stderr
    with pytest.raises(Exception):
        image_factory.client.images.get(ref)  # nothing loaded


@pytest.mark.e2e
def test_transport_http_starts_no_ctorrent(registry_server, image_factory, docket_cli, tmp_path: Path):
    ref, marker = image_factory.build(data_mib=1)
    docket_cli("push", ref, registry=registry_server)
    image_factory.remove(ref)
    location = tmp_path / "http"
    pull = docket_cli("pull", "--json", "--seed-time", "0", ref, registry=registry_server, location=location,
                      env={"DOCKET_TRANSPORT": "http"})
    s = _summary(pull)
    assert s["loaded"] and s["transport"] == "http" and s["transport_requested"] == "http"
    assert s["bytes_from_peers"] == 0 and s["bytes_from_http"] > 0 and "Warning" not in pull.stderr
    assert not _ctorrent_logs(location) and "BitTorrent" not in pull.stderr
    assert image_factory.run(ref) == marker


@pytest.mark.e2e
def test_http_resumes_a_partial_layer_with_range(registry_server, image_factory, docket_cli, tmp_path: Path):
    """A preallocated layer file with some valid pieces (what a stopped ctorrent leaves): only the pieces that
    fail their hash are fetched."""
    ref, marker = image_factory.build(data_mib=2)
    docket_cli("push", ref, registry=registry_server)
    image_factory.remove(ref)
    layer = max(_record(registry_server, ref)["layers"], key=lambda x: x["size"])
    size, pl = layer["size"], layer["piece_length"]
    assert size > 4 * pl
    data = requests.get(f"{registry_server.url}/api/v1/blobs/{layer['digest']}", timeout=30).content
    partial = bytearray(size)  # zeros, like ctorrent's preallocation
    partial[pl:4 * pl] = data[pl:4 * pl]  # pieces 1-3 valid; 0 and 4.. missing
    location = tmp_path / "resume"
    (location / "blobs").mkdir(parents=True)
    (location / "blobs" / layer["digest"].split(":")[1]).write_bytes(bytes(partial))
    pull = docket_cli("pull", "--json", "--transport", "http", "--seed-time", "0", ref, registry=registry_server,
                      location=location)
    s = _summary(pull)
    t = next(x for x in s["layer_transfers"] if x["digest"] == layer["digest"])
    assert t["bytes_resumed"] == 3 * pl and t["bytes_from_http"] == size - 3 * pl < size
    assert s["bytes_resumed"] == 3 * pl and s["loaded"]
    assert image_factory.run(ref) == marker


class _LoopbackServer:
    """A threaded HTTP server for one handler class on a free loopback port; ``close()`` stops it."""

    def _serve(self, handler: type[http.server.BaseHTTPRequestHandler]) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _RefusingTracker(_LoopbackServer):
    """An HTTP tracker that answers every announce and scrape with a failure: reachable, but no swarm."""

    def __init__(self) -> None:
        reason = b"no swarm here (test)"
        body = b"d14:failure reason%d:%se" % (len(reason), reason)

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._serve(H)


@pytest.mark.e2e
def test_auto_falls_back_when_the_swarm_gives_nothing(image_factory, docket_cli, tmp_path: Path):
    """The tracker answers (so ctorrent runs) but refuses every announce: after --fallback-after seconds without
    progress each layer continues over HTTP."""
    need("ctorrent")
    tracker = _RefusingTracker()
    server = NoHealthRegistry(location=tmp_path / "reg", port=free_port(), tracker_port=free_port(),
                              log=tmp_path / "reg.log", extra_args=["--tracker", f"127.0.0.1:{tracker.port}"])
    server.start()
    try:
        ref, marker = image_factory.build(data_mib=1)
        docket_cli("push", ref, registry=server)
        image_factory.remove(ref)
        location = tmp_path / "stalled"
        pull = docket_cli("pull", "--json", "--fallback-after", "3", "--seed-time", "0", ref, registry=server,
                          location=location, peer_ip="127.0.0.63", timeout=120)
        s = _summary(pull)
        assert s["loaded"] and s["transport"] == "http" and s["layers_over_http"] == s["layers_downloaded"]
        assert "no progress from the swarm" in s["fallback_reason"] and "no swarm here" in s["fallback_reason"]
        assert "continuing over HTTP" in pull.stderr
        assert _ctorrent_logs(location)  # BitTorrent was tried first
        assert image_factory.run(ref) == marker
    finally:
        server.stop()
        tracker.close()


class _CorruptingProxy(_LoopbackServer):
    """Forwards to the registry; flips one byte in the body of every blob download (not torrents, not JSON)."""

    def __init__(self, upstream: str) -> None:
        session = requests.Session()

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def do_GET(self) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "accept-encoding")}
                up = session.get(upstream + self.path, headers=headers, timeout=30)
                body = up.content
                layer = "/blobs/" in self.path and not self.path.endswith("/torrent") and len(body) > 64 * 1024
                if layer:  # not the config (small), not the torrents
                    body = body[:2000] + bytes([body[2000] ^ 0xFF]) + body[2001:]
                self.send_response(up.status_code)
                for k in ("Content-Type", "Content-Range", "Docket-Content-Digest"):
                    if k in up.headers:
                        self.send_header(k, up.headers[k])
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._serve(H)


@pytest.mark.e2e
def test_corrupted_http_response_is_refused(registry_server, image_factory, docket_cli, tmp_path: Path):
    ref, _ = image_factory.build(data_mib=1)
    docket_cli("push", ref, registry=registry_server)
    image_factory.remove(ref)
    proxy = _CorruptingProxy(registry_server.url)
    try:
        pull = docket_cli("--host", f"http://127.0.0.1:{proxy.port}", "pull", "--transport", "http",
                          "--seed-time", "0", ref, location=tmp_path / "corrupt", check=False, timeout=120)
    finally:
        proxy.close()
    assert pull.returncode == 6, pull.stderr
    assert "digest" in pull.stderr and "over HTTP" in pull.stderr
    with pytest.raises(Exception):
        image_factory.client.images.get(ref)  # nothing loaded


# -- unit: a one-layer image through a scripted ctorrent that dies -----------------------------------------------


def test_one_layer_falls_back_and_resumes_over_http(served, tmp_path: Path):
    canned, data, digest = served
    canned.raw("GET", f"/api/v1/blobs/{digest}", 200, data)  # a server without Range support: bytes skipped
    res = make_puller(canned, tmp_path, data, mode="die", load=False, seed_time=0, fallback_after=30).pull(REF)
    s = res.summary()
    assert s["transport"] == "http" and s["bytes_from_http"] == len(data) and "exited" in s["fallback_reason"]
    assert FakeCtorrent.instances[-1].stopped
    assert (tmp_path / "loc" / "blobs" / digest.split(":")[1]).read_bytes() == data

    other = tmp_path / "other"
    (other / "loc" / "blobs").mkdir(parents=True)
    (other / "loc" / "blobs" / digest.split(":")[1]).write_bytes(data[:600_000])  # 2 whole pieces
    FakeCtorrent.instances.clear()
    res = make_puller(canned, other, data, load=False, seed_time=0, transport="http").pull(REF)
    whole = 600_000 // choose_piece_size(len(data)) * choose_piece_size(len(data))  # complete pieces kept
    assert res.summary()["transport"] == "http" and res.summary()["bytes_from_http"] == len(data) - whole
    assert not FakeCtorrent.instances
