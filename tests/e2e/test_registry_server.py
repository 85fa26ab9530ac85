"""The real ``docket-registry`` command: cheroot on a free port, managed opentracker, real ctorrent seeders.

Checks the vertical slice (push -> stored -> torrent -> whitelisted -> seeded -> listed), that a leecher on
another loopback address downloads the blob over BitTorrent, that killed seeders and a killed tracker come back,
that a restarted registry seeds again, and that SIGTERM leaves no child process behind.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from docket.torrent import CtorrentProcess, read_torrent, scrape
from tests.support.procs import free_port, stop_process, tail, wait_until
from tests.support.registry_images import build_image_tar, build_layered_image_tar, layer_tar

REPO_ROOT = Path(__file__).resolve().parents[2]



def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is not installed (required under CI)")
        pytest.skip(f"{tool} is not installed")


def registry_command() -> list[str]:
    """The registry program, advertising loopback: without the flag it would advertise this host's LAN address,
    and tests send traffic only to 127.0.0.0/8 (or to namespaces of their own)."""
    exe = shutil.which("docket-registry")
    return [*([exe] if exe else [sys.executable, "-m", "docket.registry"]), "--advertise-address", "127.0.0.1"]


def children(pid: int) -> set[int]:
    """Direct children of ``pid`` (all threads)."""
    out: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out |= {int(x) for x in (task / "children").read_text().split()}
        except OSError:
            pass
    return out


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")


@dataclass
class Registry:
    proc: subprocess.Popen
    url: str
    tracker_port: int
    location: Path
    log: Path

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=10, **kw)

    def seeders(self) -> dict[str, dict]:
        return {s["digest"]: s for s in self.get("/api/v1/seeders").json()["seeders"]}

    def healthz(self) -> dict:
        return self.get("/healthz").json()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    _require("ctorrent")
    _require("opentracker")
    return tmp_path_factory.mktemp("registry-e2e")


def start_registry(location: Path, port: int, tracker_port: int, log: Path) -> Registry:
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "DOCKET_REGISTRY_LOCATION": str(location), "DOCKET_REGISTRY_PORT": str(port)}  # flags via env vars, too
    args = [*registry_command(), "--bind", "127.0.0.1",
            "--tracker-port", str(tracker_port), "--log-level", "debug", "--gc-interval", "0"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    reg = Registry(proc, f"http://127.0.0.1:{port}", tracker_port, location, log)
    try:
        wait_until(lambda: proc.poll() is not None or reg.get("/healthz").status_code in (200, 503), 30,
                   what="registry to answer")
        assert proc.poll() is None, f"registry exited: {tail(log)}"
    except BaseException:
        print(tail(log))
        stop_process(proc)
        raise
    return reg


@pytest.fixture(scope="module")
def registry(workdir: Path) -> Iterator[Registry]:
    reg = start_registry(workdir / "loc", free_port(), free_port(), workdir / "registry.log")
    try:
        yield reg
    finally:
        stop_process(reg.proc, timeout=60)


@pytest.fixture(scope="module")
def pushed(registry: Registry, workdir: Path) -> dict:
    tarball = workdir / "image.tar"
    payload = os.urandom(3 * 1024 * 1024)
    build_image_tar(tarball, payload=payload, repo_tag="e2e/app:v1")
    with open(tarball, "rb") as f:  # a file object: requests streams it with Content-Length
        resp = requests.put(registry.url + "/api/v1/repositories/e2e/app/tags/v1", data=f,
                            headers={"Content-Type": "application/x-tar"}, timeout=60)
    assert resp.status_code == 201, resp.text
    rec = resp.json()
    assert rec["format"] == "layers" and len(rec["layers"]) == 1
    # the tarball was split on the server: its one layer is what is torrented and seeded
    layer = rec["layers"][0]
    layer["_sha256"] = hashlib.sha256(layer_tar(payload)).hexdigest()
    layer["_config"] = rec["config"]["digest"]
    return layer


def seeder_pid(registry: Registry, digest: str) -> int | None:
    s = registry.seeders().get(digest)
    return s["pid"] if s and s["alive"] else None


def test_push_is_seeded_and_healthy(registry: Registry, pushed: dict) -> None:
    digest = pushed["digest"]
    assert pushed["_sha256"] == digest[7:]
    assert [i["ref"] for i in registry.get("/api/v1/images").json()["images"]] == ["e2e/app:v1"]
    pid = seeder_pid(registry, digest)
    assert pid and pid in children(registry.proc.pid)
    assert pushed["_config"] not in registry.seeders()  # config blobs are HTTP only
    args = cmdline(pid)
    assert Path(args[0]).name == "ctorrent" and "-f" in args and str(registry.location) in " ".join(args)
    health = registry.healthz()
    assert health["status"] == "ok", health
    assert health["checks"]["seeders"]["seeders"][digest]["pid"] == pid
    assert pushed["info_hash"] in registry.get("/api/v1/tracker/whitelist").text.split()
    announce = registry.get("/api/v1/tracker").json()["announce_url"]
    # the seeder's first announce was accepted (whitelisted before it started)
    wait_until(lambda: scrape(announce, pushed["info_hash"]).complete >= 1, 5, what="seeder registered")


def test_leecher_downloads_over_bittorrent(registry: Registry, pushed: dict, tmp_path: Path) -> None:
    data = registry.get(pushed["torrent_url"]).content
    meta = read_torrent(data)
    assert meta.info_hash == pushed["info_hash"]
    torrent = tmp_path / "image.torrent"
    torrent.write_bytes(data)
    out = tmp_path / "image.tar"
    ip = f"127.{random.randint(100, 250)}.{random.randint(1, 250)}.{random.randint(2, 250)}"
    with CtorrentProcess(torrent, out, workdir=tmp_path / "leech", listen_ip=ip) as leecher:
        assert leecher.wait_complete(60), leecher.tail()
    assert hashlib.sha256(out.read_bytes()).hexdigest() == pushed["digest"][7:] == pushed["_sha256"]


def test_killed_seeder_is_restarted(registry: Registry, pushed: dict) -> None:
    digest = pushed["digest"]
    old = seeder_pid(registry, digest)
    assert old
    os.kill(old, signal.SIGKILL)
    new = wait_until(lambda: (p := seeder_pid(registry, digest)) and p != old and p, 5, interval=0.2,
                     what="seeder restarted")
    assert running(new) and not running(old)
    wait_until(lambda: registry.healthz()["status"] == "ok", 5, what="healthy again")


def test_killed_tracker_is_restarted_with_seeders(registry: Registry, pushed: dict) -> None:
    digest = pushed["digest"]
    tracker = registry.healthz()["checks"]["tracker"]
    old_tracker, old_seeder = tracker["pid"], seeder_pid(registry, digest)
    os.kill(old_tracker, signal.SIGKILL)

    def recovered():
        t = registry.healthz()["checks"]["tracker"]
        return (t.get("pid") not in (None, old_tracker) and t["ok"]
                and seeder_pid(registry, digest) not in (None, old_seeder))

    wait_until(recovered, 15, interval=0.2, what="tracker and seeders restarted")
    announce = registry.get("/api/v1/tracker").json()["announce_url"]
    wait_until(lambda: scrape(announce, pushed["info_hash"]).complete >= 1, 10, what="seeder announced again")


def test_chunked_push_over_http(registry: Registry, workdir: Path) -> None:
    tarball = workdir / "chunked.tar"
    build_image_tar(tarball, payload=b"chunked " * 100000, repo_tag="e2e/chunked:v1")

    def body():
        with open(tarball, "rb") as f:
            while chunk := f.read(65536):
                yield chunk

    resp = requests.put(registry.url + "/api/v1/repositories/e2e/chunked/tags/v1", data=body(),
                        headers={"Content-Type": "application/x-tar"}, timeout=60)
    assert resp.status_code == 201, resp.text
    layer = resp.json()["layers"][0]
    assert layer["digest"][7:] == hashlib.sha256(layer_tar(b"chunked " * 100000)).hexdigest()
    assert seeder_pid(registry, layer["digest"])
    assert registry.get("/healthz").status_code == 200
    assert requests.delete(registry.url + "/api/v1/repositories/e2e/chunked/tags/v1", timeout=10).status_code == 204


def test_client_disconnect_mid_upload_leaves_nothing(registry: Registry) -> None:
    before = registry.get("/api/v1/images").json()
    port = int(registry.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"PUT /api/v1/repositories/e2e/cut/tags/v1 HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/x-tar\r\nContent-Length: 10000000\r\n\r\n" + b"\0" * 3_000_000)
        wait_until(lambda: any((registry.location / "uploads").iterdir()), 10, what="upload started")
    wait_until(lambda: not any((registry.location / "uploads").iterdir()), 10, what="temp file removed")
    assert registry.get("/api/v1/images").json() == before


def test_too_large_and_bad_tar_over_http(registry: Registry) -> None:
    resp = requests.put(registry.url + "/api/v1/repositories/e2e/bad/tags/v1", data=b"not a tar" * 1000,
                        headers={"Content-Type": "application/x-tar"}, timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "INVALID_IMAGE"
    assert registry.get("/api/v1/nope").json()["error"]["code"] == "NOT_FOUND"
    assert not any((registry.location / "uploads").iterdir())


def test_shared_layer_stored_and_seeded_once(registry: Registry, workdir: Path) -> None:
    """Two images sharing a base layer, one pushed as a whole tarball, one as blobs + manifest: the base layer is one
    blob file with one seeder; every layer blob is seeded, no config blob is; health stays ok."""
    base = os.urandom(512 * 1024)
    one = build_layered_image_tar(workdir / "one.tar", [base, b"one"], repo_tag="e2e/one:v1")
    resp = requests.put(registry.url + "/api/v1/repositories/e2e/one/tags/v1", data=(workdir / "one.tar").read_bytes(),
                        headers={"Content-Type": "application/x-tar"}, timeout=60)
    assert resp.status_code == 201, resp.text
    two = build_layered_image_tar(workdir / "two.tar", [base, b"two"], layout="oci", repo_tag="e2e/two:v1")
    for data, digest in zip(two["layers"], two["diff_ids"]):
        r = requests.post(registry.url + f"/api/v1/blobs?kind=layer&digest={digest}", data=data, timeout=60)
        assert r.status_code == (200 if digest == one["diff_ids"][0] else 201), r.text
        assert r.json()["info_hash"]
    r = requests.post(registry.url + f"/api/v1/blobs?kind=config&digest={two['config_digest']}", data=two["config"],
                      timeout=60)
    assert r.status_code == 201 and r.json()["info_hash"] is None
    r = requests.put(registry.url + "/api/v1/repositories/e2e/two/manifests/v1",
                     json={"config": two["config_digest"], "layers": two["diff_ids"]}, timeout=60)
    assert r.status_code == 201, r.text
    shared = one["diff_ids"][0]
    assert two["diff_ids"][0] == shared
    assert (registry.location / "blobs" / "sha256" / shared[7:]).is_file()
    assert sum(1 for p in (registry.location / "blobs" / "sha256").iterdir() if p.name == shared[7:]) == 1
    seeders = registry.seeders()
    layer_digests = {*one["diff_ids"], *two["diff_ids"]}
    assert layer_digests <= set(seeders) and one["config_digest"] not in seeders and two["config_digest"] not in seeders
    pids = [info["pid"] for d, info in seeders.items() if d == shared]
    assert len(pids) == 1 and pids[0] in children(registry.proc.pid)
    assert sum(1 for pid in children(registry.proc.pid) if shared[7:] in " ".join(cmdline(pid))) == 1
    wait_until(lambda: registry.healthz()["status"] == "ok", 10, what="healthy")
    announce = registry.get("/api/v1/tracker").json()["announce_url"]
    info_hash = r.json()["layers"][0]["info_hash"]
    wait_until(lambda: scrape(announce, info_hash).complete >= 1, 10, what="shared layer seeded")
    for ref in ("one/tags/v1", "two/tags/v1"):
        assert requests.delete(registry.url + f"/api/v1/repositories/e2e/{ref}", timeout=10).status_code == 204


def test_sigterm_stops_children_and_restart_resumes(registry: Registry, pushed: dict, workdir: Path) -> None:
    digest = pushed["digest"]
    kids = children(registry.proc.pid)
    assert len(kids) >= 2  # opentracker + one seeder
    registry.proc.send_signal(signal.SIGTERM)
    assert registry.proc.wait(60) == 0
    wait_until(lambda: not any(running(k) for k in kids), 10, what="children gone")

    port = int(registry.url.rsplit(":", 1)[1])
    again = start_registry(registry.location, port, registry.tracker_port, workdir / "registry2.log")
    try:
        images = again.get("/api/v1/images").json()["images"]
        assert [[layer["digest"] for layer in i["layers"]] for i in images if i["ref"] == "e2e/app:v1"] == [[digest]]
        pid = wait_until(lambda: seeder_pid(again, digest), 10, what="seeding resumed")
        assert pid not in kids
        wait_until(lambda: again.healthz()["status"] == "ok", 10, what="healthy after restart")
        kids2 = children(again.proc.pid)
    finally:
        again.proc.send_signal(signal.SIGTERM)
        try:
            again.proc.wait(60)
        finally:
            stop_process(again.proc)
    wait_until(lambda: not any(running(k) for k in kids2), 10, what="children gone")
    registry.proc = again.proc  # already stopped; the module fixture's stop is a no-op


def test_missing_location_permission_is_a_clear_error(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([*registry_command(), "-l", str(blocked / "loc"), "-p", str(free_port()), "--no-seeding"],
                       capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    assert "not writable" in r.stderr and "--location" in r.stderr


def test_help_lists_env_vars() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    r = subprocess.run([*registry_command(), "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0
    for var in ("DOCKET_TRACKER", "DOCKET_REGISTRY_PORT", "DOCKET_REGISTRY_LOCATION", "DOCKET_REGISTRY_DB", "DOCKET_ADVERTISE_ADDRESS"):
        assert var in r.stdout


def test_external_tracker(tmp_path: Path) -> None:
    """--tracker HOST:PORT: torrents announce there; the whitelist endpoint is what the operator syncs."""
    _require("ctorrent")
    _require("opentracker")
    from docket.torrent import Opentracker

    tport = free_port()
    with Opentracker("127.0.0.1", tport, tmp_path / "ot") as ot:
        port = free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "DOCKET_TRACKER": f"127.0.0.1:{tport}"}
        args = [*registry_command(), "-l", str(tmp_path / "loc"), "-p", str(port), "--bind", "127.0.0.1",
                "--gc-interval", "0"]
        log = tmp_path / "registry.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda: requests.get(url + "/healthz", timeout=5).status_code == 200, 30, what="registry up")
            info = requests.get(url + "/api/v1/tracker", timeout=5).json()
            assert info == {"announce_url": f"http://127.0.0.1:{tport}/announce", "managed": False}
            tarball = tmp_path / "img.tar"
            build_image_tar(tarball)
            rec = requests.put(url + "/api/v1/repositories/ext/app/tags/v1", data=tarball.read_bytes(),
                               headers={"Content-Type": "application/x-tar"}, timeout=30).json()
            rec = rec["layers"][0]
            torrent = requests.get(url + rec["torrent_url"], timeout=5).content
            assert read_torrent(torrent).announce == info["announce_url"]
            # the operator's sync job: whitelist endpoint -> opentracker whitelist + SIGHUP
            ot.set_whitelist(requests.get(url + "/api/v1/tracker/whitelist", timeout=5).text.split())
            wait_until(lambda: scrape(info["announce_url"], rec["info_hash"]).complete >= 1, 40, interval=0.5,
                       what="seeder announced to the external tracker after the whitelist sync")
            assert requests.get(url + "/healthz", timeout=5).json()["checks"]["tracker"]["managed"] is False
            kids = children(proc.pid)
        except BaseException:
            print(tail(log))
            raise
        finally:
            stop_process(proc, timeout=60)
        wait_until(lambda: not any(running(k) for k in kids), 10, what="seeders gone")
