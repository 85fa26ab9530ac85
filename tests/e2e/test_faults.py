"""Faults: the registry keeps its data and its promises through kill -9, dead seeders and restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from docket.registry.uploads import STALE_FILE_AGE
from tests.support.procs import free_port, stop_process, wait_until
from tests.support.registry_server import RegistryServer
from tests.support.tools import need

RESULTS = os.environ.get("DOCKET_ROBUSTNESS_RESULTS")
pytestmark = pytest.mark.databases("sqlite", "postgresql")  # each fault on both databases (db_url, tests/conftest.py)


def record(test: str, did: str, observed: str) -> None:
    """One row of docs/robustness.md's fault table (only with DOCKET_ROBUSTNESS_RESULTS=FILE; JSON lines).
    Called at the end of a test, so a row means every assertion before it held."""
    if RESULTS:
        with open(RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps({"table": "faults", "test": test, "did": did, "observed": observed}) + "\n")


def _children(pid: int) -> set[int]:
    """Direct children of ``pid`` (ctorrent seeders, opentracker)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(entry.name))
    return found


def test_kill_9_during_upload_leaves_no_tag_and_no_temp_files(registry_server, image_factory, db_url):
    ref, _ = image_factory.build(data_mib=8)
    body = b"".join(image_factory.client.images.get(ref).save(named=True))
    sent = threading.Event()

    def slow_body():
        for i in range(0, len(body), 256 * 1024):
            yield body[i : i + 256 * 1024]
            if i > len(body) // 3:
                sent.set()
            time.sleep(0.05)

    def push() -> None:
        try:
            requests.put(f"{registry_server.url}/api/v1/repositories/crash/app/tags/v1", data=slow_body(),
                         headers={"Content-Type": "application/x-tar"}, timeout=60)
        except requests.RequestException:
            pass  # the server died under it: expected

    t = threading.Thread(target=push)
    t.start()
    assert sent.wait(30)
    uploads = registry_server.location / "uploads"
    assert any(p.is_file() for p in uploads.rglob("*")), "the upload should be in progress"
    children = _children(registry_server.proc.pid)
    registry_server.proc.kill()  # kill -9 of the registry we started
    registry_server.proc.wait(10)
    registry_server.proc = None
    t.join(60)

    registry_server.start()  # a restart must succeed although the old seeders/tracker may linger
    try:
        resp = requests.get(f"{registry_server.url}/api/v1/repositories/crash/app/tags/v1", timeout=10)
        assert resp.status_code == 404
        if db_url is not None:
            # PostgreSQL: the location is shared, and another instance may be writing a fresh upload file: start-up
            # sweeps only files untouched for uploads.STALE_FILE_AGE. Aged past it, the next start removes them.
            old = time.time() - STALE_FILE_AGE - 60
            for path in uploads.rglob("*"):
                os.utime(path, (old, old))
            registry_server.restart()
        assert not any(p.is_file() for p in uploads.rglob("*"))
        assert requests.get(f"{registry_server.url}/api/v1/images", timeout=10).json() == {"images": []}
    finally:
        # whatever the killed registry left behind must have been stopped by the restart
        leftovers = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert leftovers == [], f"processes of the killed registry still running: {leftovers}"
    record("test_kill_9_during_upload_leaves_no_tag_and_no_temp_files",
           "kill -9 the registry a third into an 8 MiB tarball upload, then restart it",
           "restart ok; tag 404, uploads/ empty, listing empty; no seeder/tracker of the killed process left")


def test_restart_seeds_every_blob_again_within_10_s(registry_server, image_factory, docket_cli):
    refs = [image_factory.build(data_mib=1)[0] for _ in range(3)]
    for ref in refs:
        docket_cli("push", ref, registry=registry_server)
    registry_server.stop()
    registry_server.start()
    started = time.monotonic()

    def all_seeded() -> bool:
        seeders = registry_server.health()["checks"]["seeders"]
        return seeders.get("ok") and seeders.get("alive", 0) >= len(refs)

    wait_until(all_seeded, timeout=10, what="every blob seeded again")
    took = time.monotonic() - started
    assert took <= 10
    record("test_restart_seeds_every_blob_again_within_10_s", "push 3 images, stop and start the registry",
           f"every blob seeded again {took:.1f} s after the restarted registry answered /healthz "
           "(limit 10 s)")


def test_seeder_killed_is_restarted_within_5_s(registry_server, image_factory, docket_cli):
    ref, _ = image_factory.build(data_mib=1)
    docket_cli("push", ref, registry=registry_server)
    seeders = requests.get(f"{registry_server.url}/api/v1/seeders", timeout=10).json()["seeders"]
    digest, pid = seeders[0]["digest"], seeders[0]["pid"]
    assert pid in _children(registry_server.proc.pid)  # ours, started by the registry we started
    os.kill(pid, signal.SIGKILL)
    started = time.monotonic()

    def restarted() -> bool:
        now = {s["digest"]: s for s in
               requests.get(f"{registry_server.url}/api/v1/seeders", timeout=10).json()["seeders"]}
        return now[digest]["alive"] and now[digest]["pid"] not in (None, pid)

    wait_until(restarted, timeout=5, what="the seeder to be restarted")
    took = time.monotonic() - started
    assert took <= 5
    record("test_seeder_killed_is_restarted_within_5_s", "kill -9 one seeding ctorrent",
           f"restarted with a new pid after {took:.1f} s (limit 5 s)")


def test_corrupted_blob_is_reported_and_others_still_pull(registry_server, image_factory, docket_cli):
    bad_ref, _ = image_factory.build(data_mib=1)
    good_ref, good_marker = image_factory.build(data_mib=1)
    docket_cli("push", bad_ref, registry=registry_server)
    docket_cli("push", good_ref, registry=registry_server)
    records = {r["ref"]: r for r in requests.get(f"{registry_server.url}/api/v1/images", timeout=10).json()["images"]}
    good_layers = {layer["digest"] for layer in records[good_ref]["layers"]}
    own = [layer["digest"] for layer in records[bad_ref]["layers"] if layer["digest"] not in good_layers]
    blob = registry_server.location / "blobs" / "sha256" / own[0].split(":")[1]
    blob.unlink()  # a layer only the bad image uses, deleted behind the registry's back

    health = requests.get(f"{registry_server.url}/healthz", timeout=10)
    assert health.status_code == 503
    assert not health.json()["checks"]["blob_store"]["ok"]

    image_factory.remove(bad_ref)
    failed = docket_cli("pull", "--seed-time", "0", "--stall-timeout", "15", bad_ref, registry=registry_server,
                        peer_ip="127.0.0.41", check=False)
    assert failed.returncode != 0
    assert failed.stderr.strip()

    image_factory.remove(good_ref)
    docket_cli("pull", "--seed-time", "0", good_ref, registry=registry_server, peer_ip="127.0.0.42")
    assert image_factory.run(good_ref) == good_marker
    record("test_corrupted_blob_is_reported_and_others_still_pull", "delete a layer file behind the registry's back",
           f"/healthz 503 (blob_store not ok); pull of that image exit {failed.returncode}; other image pulls and runs")


# -- corruption detected by the scrubber ------------------------------------------------------------------------

@pytest.fixture
def scrubbing_registry(tmp_path: Path, db_url: str | None) -> Iterator[RegistryServer]:
    """A registry that re-hashes every blob each second (--scrub-interval 1)."""
    need("ctorrent")
    need("opentracker")
    server = RegistryServer(location=tmp_path / "registry", port=free_port(), tracker_port=free_port(),
                            log=tmp_path / "registry.log", extra_args=["--scrub-interval", "1"], db_url=db_url)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _layers(server: RegistryServer) -> dict[str, dict]:
    return {r["ref"]: r for r in requests.get(f"{server.url}/api/v1/images", timeout=10).json()["images"]}


def test_same_size_corruption_is_found_by_the_scrubber_and_not_served(scrubbing_registry, image_factory,
                                                                       docket_cli):
    server = scrubbing_registry
    bad_ref, _ = image_factory.build(data_mib=1)
    good_ref, good_marker = image_factory.build(data_mib=1)
    docket_cli("push", bad_ref, registry=server)
    docket_cli("push", good_ref, registry=server)
    records = _layers(server)
    good_layers = {layer["digest"] for layer in records[good_ref]["layers"]}
    own = max((layer for layer in records[bad_ref]["layers"] if layer["digest"] not in good_layers),
              key=lambda layer: layer["size"])
    digest = own["digest"]
    blob = server.location / "blobs" / "sha256" / digest.split(":")[1]
    size = blob.stat().st_size
    with open(blob, "r+b") as f:  # flip one byte in the middle: same size, so a stat check cannot see it
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert blob.stat().st_size == size

    def reported() -> dict | None:
        resp = requests.get(f"{server.url}/healthz", timeout=10)
        store = resp.json()["checks"]["blob_store"]
        return resp.json() if resp.status_code == 503 and digest in store.get("corrupt", []) else None

    health = wait_until(reported, timeout=30, what="the scrubber to report the corrupt blob")
    assert digest in health["checks"]["blob_store"]["error"]
    assert health["checks"]["seeders"]["ok"], "the other blobs are still seeded"

    for path in (f"/api/v1/blobs/{digest}", f"/api/v1/blobs/{digest}/torrent"):
        resp = requests.get(server.url + path, timeout=10)
        assert resp.status_code == 503, path
        err = resp.json()["error"]
        assert err["code"] == "BLOB_CORRUPT" and digest in err["message"] and err["hint"]
    seeders = requests.get(f"{server.url}/api/v1/seeders", timeout=10).json()["seeders"]
    assert digest not in {s["digest"] for s in seeders if s["alive"]}, "a corrupt blob must not be seeded"
    scrub = requests.post(f"{server.url}/api/v1/admin/scrub", timeout=60).json()
    assert digest in [c["digest"] for c in scrub["corrupt"]]

    image_factory.remove(bad_ref)
    failed = docket_cli("pull", "--seed-time", "0", "--stall-timeout", "15", bad_ref, registry=server,
                        peer_ip="127.0.0.43", check=False)
    assert failed.returncode != 0
    assert "corrupt" in failed.stderr and digest in failed.stderr, failed.stderr

    image_factory.remove(good_ref)
    docket_cli("pull", "--seed-time", "0", good_ref, registry=server, peer_ip="127.0.0.44")
    assert image_factory.run(good_ref) == good_marker
    first = next(line for line in failed.stderr.splitlines() if line.startswith("Error"))
    record("test_same_size_corruption_is_found_by_the_scrubber_and_not_served",
           "flip one byte of a layer file in place (same size); registry with --scrub-interval 1",
           f"/healthz 503 naming it under blob_store.corrupt; GET blob and torrent 503 BLOB_CORRUPT; its seeder "
           f"stopped; pull exit {failed.returncode} ({first[:120]}); the other image pulls and runs")


def test_corrupt_blob_is_repaired_by_pushing_again(scrubbing_registry, image_factory, docket_cli):
    server = scrubbing_registry
    ref, marker = image_factory.build(data_mib=1)
    docket_cli("push", ref, registry=server)
    layer = max(_layers(server)[ref]["layers"], key=lambda layer: layer["size"])
    blob = server.location / "blobs" / "sha256" / layer["digest"].split(":")[1]
    data = bytearray(blob.read_bytes())
    data[len(data) // 3] ^= 0x01
    blob.write_bytes(bytes(data))
    wait_until(lambda: requests.get(f"{server.url}/healthz", timeout=10).status_code == 503, timeout=30,
               what="the corruption to be reported")
    docket_cli("push", ref, registry=server)  # HEAD of the corrupt blob is 404: the push uploads it again
    wait_until(lambda: requests.get(f"{server.url}/healthz", timeout=10).status_code == 200, timeout=30,
               what="healthz to recover after the re-push")
    assert requests.get(f"{server.url}/api/v1/blobs/{layer['digest']}", timeout=10).status_code == 200
    image_factory.remove(ref)
    docket_cli("pull", "--seed-time", "0", ref, registry=server, peer_ip="127.0.0.45")
    assert image_factory.run(ref) == marker
    record("test_corrupt_blob_is_repaired_by_pushing_again", "corrupt a layer in place, then `docket push` the image "
           "again", "the push re-uploads the layer (HEAD answers 404 for a corrupt blob); /healthz 200; pull works")


# -- an interrupted pull resumes -------------------------------------------------------------------------------

def _ctorrents_using(path: Path) -> list[int]:
    """ctorrent processes whose command line mentions ``path`` (ours: the pull's --location)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and os.path.basename(cmdline[0]) == b"ctorrent" and any(str(path).encode() in a
                                                                                for a in cmdline):
                found.append(int(entry.name))
    return found


def test_interrupted_pull_resumes_where_it_stopped(registry_server, image_factory, docket_cli, tmp_path):
    ref, marker = image_factory.build(data_mib=8)
    docket_cli("push", ref, registry=registry_server)
    layer = max(_layers(registry_server)[ref]["layers"], key=lambda layer: layer["size"])
    image_factory.remove(ref)
    location = tmp_path / "puller"
    blob = location / "blobs" / layer["digest"].split(":")[1]
    cmd = [sys.executable, "-m", "docket.client.cli", "--host", "http://127.0.0.1", "--port",
           str(registry_server.port), "--location", str(location), "pull", "--seed-time", "0",
           "--max-download-rate", "400KiB", ref]
    env = {**os.environ, "DOCKET_PEER_IP": "127.0.0.46"}
    log = tmp_path / "first-pull.log"
    with open(log, "wb") as out:
        first = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def on_disk() -> int:
            try:
                return blob.stat().st_blocks * 512
            except FileNotFoundError:
                return 0

        wait_until(lambda: on_disk() >= 2 * 1024 * 1024, timeout=60, what="2 MiB of the layer on disk")
        assert first.poll() is None, "the rate-limited pull should still be running"
        first.send_signal(signal.SIGTERM)
        rc = first.wait(30)
    finally:
        stop_process(first)
    assert rc != 0, log.read_text()
    wait_until(lambda: not _ctorrents_using(location), timeout=10, what="no ctorrent left by the pull")
    partial = on_disk()
    assert partial < layer["size"], "the layer must not be complete yet (is --max-download-rate applied?)"

    second = docket_cli("pull", "--seed-time", "0", "--json", ref, registry=registry_server, location=location,
                        peer_ip="127.0.0.47")
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["loaded"] and image_factory.run(ref) == marker
    assert summary["bytes_resumed"] >= 1024 * 1024, summary
    assert summary["bytes_from_peers"] < summary["bytes"], summary
    record("test_interrupted_pull_resumes_where_it_stopped",
           f"pull an image with an 8 MiB layer at --max-download-rate 400, SIGTERM `docket pull` with "
           f"{partial // 1024} KiB of the layer on disk, pull again without the limit",
           f"first pull exit {rc}, no ctorrent left; second pull resumed {summary['bytes_resumed']} bytes "
           f"(bytes_resumed), downloaded the rest, loaded and ran")
