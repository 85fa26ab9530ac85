"""Unit tests of the `docket` client: CLI parsing, peer address choice, error mapping, the registry client
against a tiny real HTTP server, torrent/metadata cross-checks, and pull orchestration with a scripted ctorrent.

No dockerd, ctorrent or registry needed: those are covered by the end-to-end tests.
"""

from __future__ import annotations

import ipaddress
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from docket import errors, netaddr
from docket.client import peer
from docket.client.api import RegistryClient, base_url
from docket.client.cli import AppContext, cli, default_location, plain_table
from docket.client.records import LayeredRecord, check_layer_torrent
from docket.reference import Reference
from docket.torrent.metainfo import build_torrent, read_torrent
from tests.support.fakes import REF, Canned, FakeCtorrent, make_puller, make_record
from tests.support.procs import free_port


def run_cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def registry_args(c: Canned, tmp_path: Path) -> list[str]:
    return ["-h", "http://127.0.0.1", "-p", str(c.port), "-l", str(tmp_path / "loc")]


# -- CLI parsing --------------------------------------------------------------------------------------------

def test_help_is_double_dash_and_h_is_host():
    r = run_cli("--help")
    assert r.exit_code == 0
    for word in ("push", "pull", "images", "--host", "DOCKET_HOST", "DOCKET_PORT", "DOCKET_LOCATION"):
        assert word in r.output
    r = run_cli("-h")  # -h needs a value: it is the host
    assert r.exit_code == 2
    for sub in ("push", "pull", "images"):
        assert run_cli(sub, "--help").exit_code == 0


@pytest.mark.parametrize("bad", ["Bad Ref", "UPPER:v1", "foo@sha256:" + "a" * 64, "foo:", "../etc:v1", "a;rm -rf /"])
@pytest.mark.parametrize("command", ["push", "pull"])
def test_bad_reference_fails_fast_without_network(canned, tmp_path, bad, command):
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), command, bad])
    assert r.exit_code == 2, r.output
    assert "Error:" in r.output
    assert canned.requests == []  # nothing reached the registry
    assert not (tmp_path / "loc").exists()


def _config_probe() -> click.Command:
    @click.command("probe-config")
    @click.pass_obj
    def probe(obj: AppContext) -> None:
        c = obj.config
        click.echo(json.dumps({"url": obj.registry.url, "location": str(c.location), "quiet": c.quiet}))

    return probe


@pytest.fixture
def probe():
    cmd = _config_probe()
    cli.add_command(cmd)
    yield lambda *a, env=None: json.loads(run_cli(*a, "probe-config", env=env).output)
    cli.commands.pop("probe-config")


def test_env_vars_and_defaults(probe, tmp_path, monkeypatch):
    monkeypatch.delenv("DOCKET_HOST", raising=False)
    monkeypatch.delenv("DOCKET_PORT", raising=False)
    monkeypatch.delenv("DOCKET_LOCATION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    got = probe()
    assert got["url"] == "http://127.0.0.1:8000"
    assert got["location"] == str(tmp_path / "xdg" / "docket")
    got = probe(env={"DOCKET_HOST": "http://127.0.0.5", "DOCKET_PORT": "9001", "DOCKET_LOCATION": "rel/dir"})
    assert got["url"] == "http://127.0.0.5:9001"
    assert Path(got["location"]).is_absolute() and got["location"].endswith("rel/dir")
    # flags win over the environment
    got = probe("-h", "https://reg.example:8443", "-p", "1234", env={"DOCKET_HOST": "http://x"})
    assert got["url"] == "https://reg.example:8443"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_location() == tmp_path / "home" / ".cache" / "docket"


def test_base_url_forms():
    assert base_url(None, None) == "http://127.0.0.1:8000"
    assert base_url("http://127.0.0.1", 8000) == "http://127.0.0.1:8000"
    assert base_url("127.0.0.1", 9000) == "http://127.0.0.1:9000"
    assert base_url("http://127.0.0.1:7000", 8000) == "http://127.0.0.1:7000"
    assert base_url("https://reg.example/", 8000) == "https://reg.example:8000"
    assert base_url("https://reg.example:443/prefix/", 8000) == "https://reg.example:443/prefix"
    for bad in ("ftp://x", "http://", "http://h:99999"):
        with pytest.raises(errors.InvalidRequest):
            base_url(bad, 8000)


# -- peer address -------------------------------------------------------------------------------------------

def test_peer_ip_for_local_tracker_is_fresh_loopback():
    seen = set()
    for _ in range(20):
        ip = peer.choose_peer_ip("http://127.0.0.1:6969/announce")
        addr = ipaddress.ip_address(ip)
        assert addr.is_loopback and ip != "127.0.0.1"
        assert int(ip.split(".")[1]) >= 1  # never 127.0.0.x where seeders live
        assert ip.split(".")[3] not in ("0", "255")
        seen.add(ip)
    assert len(seen) > 1
    assert peer.choose_peer_ip("http://localhost:6969/announce").startswith("127.")
    # a tracker on one of this host's own (non-loopback) addresses is local too: the seeder is on this host
    own = next((a for a in netaddr.interface_addresses().values() if not a.startswith("127.")), None)
    if own is not None:
        assert ipaddress.ip_address(peer.choose_peer_ip(f"http://{own}:6969/announce")).is_loopback


def test_peer_ip_override_and_remote_tracker():
    assert peer.choose_peer_ip("http://127.0.0.1:6969/announce", "127.0.0.9") == "127.0.0.9"
    # another host: the address we reach it from (no route: None, ctorrent's default)
    assert peer.choose_peer_ip("http://192.0.2.10:6969/announce") == netaddr.route_source("192.0.2.10")
    with pytest.raises(errors.InvalidRequest):
        peer.choose_peer_ip("http://127.0.0.1/announce", "not-an-ip")
    with pytest.raises(errors.InvalidRequest):
        peer.validate_peer_ip("::1")


def test_bad_peer_ip_is_a_usage_error(canned, tmp_path):
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), "pull", "--peer-ip", "nope", "a:b"])
    assert r.exit_code == 2 and "--peer-ip" in r.output
    assert canned.requests == []


# -- errors -------------------------------------------------------------------------------------------------

def test_registry_down_is_a_clear_error(tmp_path):
    port = free_port()
    for cmd in (["images"], ["pull", "foo:v1"], ["images", "--json"]):
        r = CliRunner().invoke(cli, ["-p", str(port), "-l", str(tmp_path / "loc"), *cmd])
        assert r.exit_code == errors.ServiceUnavailable.exit_code != 0
        assert f"Error: cannot reach the registry at http://127.0.0.1:{port}" in r.output
        assert "is docket-registry running? check --host/--port" in r.output


def test_traceback_flag_reraises(tmp_path):
    r = CliRunner().invoke(cli, ["--traceback", "-p", str(free_port()), "images"])
    assert r.exit_code != 0
    assert isinstance(r.exception, errors.ServiceUnavailable)


def test_server_json_errors_become_docket_errors(canned):
    canned.json("GET", "/api/v1/repositories/team/app/tags/v1", 404,
                {"error": {"code": "NOT_FOUND", "message": "no such tag team/app:v1", "hint": "push it first"}})
    canned.json("GET", "/api/v1/images", 503,
                {"error": {"code": "UNAVAILABLE", "message": "tracker down", "hint": "start opentracker"}})
    canned.json("POST", "/api/v1/blobs?kind=layer", 413,
                {"error": {"code": "TOO_LARGE", "message": "upload exceeds 10 bytes", "hint": None}})
    canned.raw("GET", "/api/v1/blobs/sha256:" + "a" * 64 + "/torrent", 500, b"<html>oops</html>", "text/html")
    client = RegistryClient("http://127.0.0.1", canned.port)
    with pytest.raises(errors.NotFound) as e:
        client.get_image(Reference("team/app", "v1"))
    assert "docket images" in e.value.hint and "team/app:v1" in e.value.message
    with pytest.raises(errors.ServiceUnavailable) as e:
        client.list_images()
    assert e.value.message == "tracker down" and e.value.hint == "start opentracker"
    with pytest.raises(errors.TooLarge) as e:
        client.upload_blob("layer", iter([b"x" * 100]))
    assert "exceeds" in e.value.message
    with pytest.raises(errors.DocketError) as e:
        client.get_torrent("sha256:" + "a" * 64)
    assert "HTTP 500" in e.value.message and "oops" in e.value.message


def test_read_timeout_is_applied():
    import socket

    with socket.socket() as s:  # accepts (backlog) but never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        client = RegistryClient("http://127.0.0.1", s.getsockname()[1], read_timeout=0.5)
        t0 = time.monotonic()
        with pytest.raises(errors.ServiceUnavailable) as e:
            client.list_images()
        assert time.monotonic() - t0 < 5
        assert "did not answer" in e.value.message


def test_push_streams_chunked_and_reports_progress(canned):
    record = {"digest": "sha256:" + "b" * 64, "size": 5000}
    canned.json("POST", "/api/v1/blobs?kind=layer", 201, record)
    chunks = [bytes([i]) * 1000 for i in range(5)]
    seen: list[int] = []
    produced: list[int] = []

    def gen():
        for i, c in enumerate(chunks):
            produced.append(i)
            yield c

    got = RegistryClient("127.0.0.1", canned.port).upload_blob("layer", gen(), progress_cb=seen.append)
    assert got == record
    req = canned.requests[-1]
    assert req["headers"].get("Transfer-Encoding") == "chunked"
    assert req["headers"].get("Content-Type") == "application/octet-stream"
    assert req["body"] == b"".join(chunks)
    assert seen == [1000, 2000, 3000, 4000, 5000]


def test_push_export_failure_is_reraised_as_itself(canned):
    canned.json("POST", "/api/v1/blobs?kind=layer", 201, {})

    def gen():
        yield b"x" * 10
        raise errors.ServiceUnavailable("docker died")

    with pytest.raises(errors.ServiceUnavailable, match="docker died"):
        RegistryClient("127.0.0.1", canned.port).upload_blob("layer", gen())


# -- images -------------------------------------------------------------------------------------------------

def test_images_empty_is_not_an_error(canned, tmp_path):
    canned.json("GET", "/api/v1/images", 200, {"images": []})
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), "images"])
    assert r.exit_code == 0
    assert f"No images in the registry at {canned.url}." in r.output
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), "images", "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == []


def test_images_table_and_json(canned, tmp_path):
    rec = {"repository": "team/app", "tag": "v1", "ref": "team/app:v1", "image_id": "sha256:" + "1" * 64,
           "created": "2020-01-01T00:00:00Z", "size": 4_400_000, "digest": "sha256:" + "2" * 64,
           "info_hash": "3" * 40}
    canned.json("GET", "/api/v1/images", 200, {"images": [rec]})
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), "images"])
    assert r.exit_code == 0
    lines = r.output.splitlines()
    assert lines[0].split() == ["REPOSITORY:TAG", "IMAGE", "ID", "SIZE", "CREATED", "DIGEST"]
    assert "team/app:v1" in lines[1] and "111111111111" in lines[1] and "4.4 MB" in lines[1]
    assert "years ago" in lines[1] and "sha256:222222222222" in lines[1]
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), "images", "--json"])
    assert json.loads(r.output) == [rec]
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), "-q", "images"])
    assert r.output.strip() == "team/app:v1"
    assert plain_table(("A", "BB"), [("xxx", "y")]) == ["A     BB", "xxx   y"]


# -- torrent vs metadata -------------------------------------------------------------------------------------


def test_info_hash_mismatch_is_refused_before_download(canned, tmp_path, blob):
    path, data = blob
    meta = build_torrent(path, "http://127.0.0.1:1/announce", out=tmp_path / "t.torrent")
    torrent = (tmp_path / "t.torrent").read_bytes()
    rec = make_record(canned, data, "f" * 40)  # the metadata promises another torrent
    canned.json("GET", "/api/v1/repositories/team/app/tags/v1", 200, rec)
    canned.raw("GET", f"/api/v1/blobs/{rec['digest']}/torrent", 200, torrent, "application/x-bittorrent")
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), "pull", "--no-load", "team/app:v1"])
    assert r.exit_code == errors.IntegrityError.exit_code, r.output
    assert "info hash" in r.output and meta.info_hash in r.output
    assert not (tmp_path / "loc" / "blobs").exists()  # nothing downloaded, nothing created

    # and a torrent that matches the hash but not the size
    ref = Reference("team/app", "v1")
    layer = LayeredRecord.from_json(ref, dict(rec, size=rec["size"] + 1, layers=[
        dict(rec["layers"][0], info_hash=meta.info_hash, size=len(data) + 1)])).layers[0]
    with pytest.raises(errors.IntegrityError, match="describes"):
        check_layer_torrent(read_torrent(torrent), layer, ref)


def test_garbage_torrent_and_bad_record_are_integrity_errors(canned, tmp_path, blob):
    _, data = blob
    rec = make_record(canned, data, "a" * 40)
    canned.json("GET", "/api/v1/repositories/team/app/tags/v1", 200, rec)
    canned.raw("GET", f"/api/v1/blobs/{rec['digest']}/torrent", 200, b"<html>not a torrent</html>")
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), "pull", "--no-load", "team/app:v1"])
    assert r.exit_code == errors.IntegrityError.exit_code, r.output
    for field_name, value in (("digest", "sha256:../../etc"), ("size", -1), ("info_hash", "xyz")):
        with pytest.raises(errors.IntegrityError, match=field_name):
            LayeredRecord.from_json(Reference("a"), dict(rec, layers=[dict(rec["layers"][0], **{field_name: value})]))


def test_pull_unknown_tag_is_not_found(canned, tmp_path):
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), "pull", "--no-load", "nope"])
    assert r.exit_code == errors.NotFound.exit_code
    assert "nope:latest" in r.output


# -- pull orchestration with a scripted ctorrent ------------------------------------------------------------


def test_pull_downloads_verifies_and_writes_output(served, tmp_path):
    canned, data, digest = served
    out = tmp_path / "out.tar"
    res = make_puller(canned, tmp_path, data, load=False, output=out, seed_time=0).pull(REF)
    assert res.digest == digest and res.bytes == len(data) and not res.loaded
    with tarfile.open(out) as tar:  # the docker load tarball holds the layer
        assert tar.extractfile(next(m for m in tar if m.name.endswith("layer.tar"))).read() == data
    blob = tmp_path / "loc" / "blobs" / digest.split(":")[1]
    assert blob.read_bytes() == data
    assert (tmp_path / "loc").stat().st_mode & 0o777 == 0o700
    (proc,) = FakeCtorrent.instances
    ip = proc.kw["listen_ip"]  # same-host tracker: a fresh loopback address of our own
    assert ip.startswith("127.") and ip != "127.0.0.1" and proc.stopped
    assert {"ref", "digest", "image_id", "bytes", "seconds", "loaded", "output", "transport", "transport_requested",
            "bytes_from_http", "fallback_reason"} <= set(res.summary())
    assert res.summary()["transport"] == "p2p" and res.summary()["bytes_from_http"] == 0

    # a second pull finds the verified file and starts no ctorrent
    res2 = make_puller(canned, tmp_path, data, load=False, seed_time=0).pull(REF)
    assert res2.extra["layers_cached"] == 1 and len(FakeCtorrent.instances) == 1


def test_pull_corrupt_download_is_deleted(served, tmp_path):
    canned, data, digest = served
    with pytest.raises(errors.IntegrityError, match="expected"):
        make_puller(canned, tmp_path, data, mode="corrupt", load=False, seed_time=0).pull(REF)
    assert not (tmp_path / "loc" / "blobs" / digest.split(":")[1]).exists()
    assert FakeCtorrent.instances[0].stopped


def test_pull_stall_and_death_are_transfer_errors_naming_the_tracker(served, tmp_path):
    canned, data, _ = served
    with pytest.raises(errors.TransferError) as e:
        make_puller(canned, tmp_path, data, mode="stall", load=False, stall_timeout=0.3, transport="p2p").pull(REF)
    assert "no download progress" in e.value.message and "http://127.0.0.1:6969/announce" in e.value.message
    assert "tracker said no" in e.value.message
    assert FakeCtorrent.instances[-1].stopped
    with pytest.raises(errors.TransferError) as e:
        make_puller(canned, tmp_path, data, mode="die", load=False, transport="p2p").pull(REF)
    assert "exited" in e.value.message and "6969" in e.value.message


def test_seeding_goes_on_while_the_tracker_counts_downloaders_even_with_no_peer_connected(served, tmp_path,
                                                                                        monkeypatch):
    """No downloading peer connected to us is not a reason to stop: stragglers connect later (the swarm
    benchmark's worst rounds came from that rule). Only the tracker's count, or --seed-time, ends seeding."""
    canned, data, _ = served
    from docket.torrent.tracker import ScrapeResult

    monkeypatch.setattr(FakeCtorrent, "leechers_after_completion", 0)
    scrapes = [ScrapeResult(1, 4, 0)] * 500  # four peers still downloading, per the tracker
    t0 = time.monotonic()
    make_puller(canned, tmp_path, data, load=False, seed_time=3, scrapes=scrapes, peer_ip="127.0.0.9").pull(REF)
    assert time.monotonic() - t0 >= 3  # the whole --seed-time
    assert FakeCtorrent.instances[-1].stopped


def test_seeding_continues_while_a_peer_downloads(served, tmp_path):
    canned, data, _ = served
    from docket.torrent.tracker import ScrapeResult

    scrapes = [ScrapeResult(1, 4, 0)] * 500  # incomplete peers, and one connected to us (leechers=1)
    t0 = time.monotonic()
    make_puller(canned, tmp_path, data, load=False, seed_time=3, scrapes=scrapes, peer_ip="127.0.0.9").pull(REF)
    assert time.monotonic() - t0 >= 3  # seeded the whole --seed-time


def test_seeding_stops_early_when_no_peer_is_downloading(served, tmp_path):
    canned, data, _ = served
    from docket.torrent.tracker import ScrapeResult

    scrapes = [ScrapeResult(1, 2, 0), ScrapeResult(3, 0, 2), ScrapeResult(3, 0, 2)] + [ScrapeResult(3, 0, 2)] * 50
    t0 = time.monotonic()
    res = make_puller(canned, tmp_path, data, load=False, seed_time=30, scrapes=scrapes,
                      peer_ip="127.0.0.9").pull(REF)
    assert time.monotonic() - t0 < 10  # not the whole 30 s
    proc = FakeCtorrent.instances[-1]
    assert proc.kw["listen_ip"] == "127.0.0.9" and proc.stopped
    assert res.output is None


@pytest.mark.parametrize("fmt", ["tarball", None])
def test_a_whole_tarball_record_asks_to_upgrade_the_registry(canned, tmp_path, fmt):
    """A registry from before layer-level distribution answers format "tarball" (or no format): this client pulls
    layers only, and says to upgrade the registry (it converts those images to layers at its next start)."""
    rec = {"repository": "team/app", "tag": "v1", "ref": "team/app:v1", "image_id": "sha256:" + "c" * 64,
           "created": "2026-01-01T00:00:00Z", "size": 10, "digest": "sha256:" + "d" * 64, "info_hash": "a" * 40}
    if fmt:
        rec["format"] = fmt
    canned.json("GET", "/api/v1/repositories/team/app/tags/v1", 200, rec)
    r = CliRunner().invoke(cli, [*registry_args(canned, tmp_path), "pull", "--no-load", "team/app:v1"])
    assert r.exit_code == errors.InvalidRequest.exit_code, r.output
    assert "whole image tarball" in r.output and "upgrade the registry" in r.output
    assert [q["path"] for q in canned.requests] == ["/api/v1/repositories/team/app/tags/v1"]  # nothing else asked
    assert not (tmp_path / "loc").exists()


def test_requests_the_registry_never_answered_are_sent_again():
    """Behind a load balancer one registry instance may die mid-request (docs/instances.md): a GET whose
    connection was cut, or that got the proxy's 502/503 page, is sent again; a POST with a streamed body is not."""
    import socket
    import threading

    answers = ["cut", "proxy-503", "ok"]
    seen: list[str] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]

    def serve() -> None:
        while answers:
            conn, _ = server.accept()
            with conn:
                request = conn.recv(65536).decode()
                seen.append(request.split(" ", 2)[0])
                kind = answers.pop(0)
                if kind == "cut":
                    continue  # closed without a byte of answer
                if kind == "proxy-503":
                    body = b"<html>503 Service Unavailable</html>"
                    conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                else:
                    body = b'{"hosts": []}'
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with RegistryClient("http://127.0.0.1", port, read_timeout=5) as client:
        resp = client._request("GET", "/api/v1/hosts", "list hosts")
        assert resp.json() == {"hosts": []}
    assert seen == ["GET", "GET", "GET"]
    thread.join(5)
    # a POST is not sent twice: the first cut is the answer
    answers[:] = ["cut"]
    seen.clear()
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with RegistryClient("http://127.0.0.1", port, read_timeout=5) as client:
        with pytest.raises(errors.ServiceUnavailable, match="closed the connection|cannot reach"):
            client._request("POST", "/api/v1/blobs", "upload", data=iter([b"x"]))
    assert seen == ["POST"]
    thread.join(5)
    server.close()
