"""Faults: the registry keeps its data and its promises through kill -9, dead seeders and restarts."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from procs import wait_until

pytestmark = pytest.mark.e2e


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


def test_kill_9_during_upload_leaves_no_tag_and_no_temp_files(registry_server, image_factory):
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
        assert not any(p.is_file() for p in uploads.rglob("*"))
        assert requests.get(f"{registry_server.url}/api/v1/images", timeout=10).json() == {"images": []}
    finally:
        # whatever the killed registry left behind must have been stopped by the restart
        leftovers = [pid for pid in children if Path(f"/proc/{pid}").exists()]
        assert leftovers == [], f"processes of the killed registry still running: {leftovers}"


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
    assert time.monotonic() - started <= 10


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
    assert time.monotonic() - started <= 5


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
