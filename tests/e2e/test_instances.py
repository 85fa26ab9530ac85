"""Two real `docket-registry` processes on one PostgreSQL database, one location and one `docket-tracker`
(docs/instances.md): a layer pushed through one is seeded by both (the tracker counts two seeders) and the other
stays healthy meanwhile; when the leader is killed with SIGKILL the other leads within seconds, and the killed one
restarted at once starts (as a follower) and stops the ctorrent its previous process left.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from docket.registry.seeder import reap_dirs
from docket.torrent import scrape
from tests.support.procs import free_port, managed_process, port_open, wait_until
from tests.support.registry_server import RegistryServer
from tests.support.tools import need, program


def push(url: str, layer: bytes) -> tuple[str, str]:
    """A layer, its config, then the manifest that tags them (which waits until the tracker accepts the layer):
    the layer's (digest, info hash)."""
    octets = {"Content-Type": "application/octet-stream"}
    resp = requests.post(f"{url}/api/v1/blobs?kind=layer", data=layer, headers=octets, timeout=30)
    assert resp.status_code == 201, resp.text
    digest, info_hash = resp.json()["digest"], resp.json()["info_hash"]
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [digest]}}).encode()
    resp = requests.post(f"{url}/api/v1/blobs?kind=config", data=config, headers=octets, timeout=30)
    assert resp.status_code == 201, resp.text
    resp = requests.put(f"{url}/api/v1/repositories/team/app/manifests/v1", timeout=60,
                        json={"config": resp.json()["digest"], "layers": [digest]})
    assert resp.status_code == 201, resp.text
    return digest, info_hash


def test_every_instance_seeds_every_blob_and_the_lead_moves(tmp_path: Path, pg_url: str) -> None:
    need("ctorrent")
    need("opentracker")
    location, tracker_port = tmp_path / "registry", free_port()
    shared = ["--db", pg_url, "--tracker", f"127.0.0.1:{tracker_port}", "--gc-interval", "2"]
    first, second = (RegistryServer(location=location, port=free_port(), tracker_port=free_port(),
                                    log=tmp_path / f"{name}.log", extra_args=[*shared, "--seed-address", address])
                     for name, address in (("first", "127.0.0.2"), ("second", "127.0.0.4")))
    tracker = [program("docket-tracker"), "--registry", first.url, "--bind", "127.0.0.1", "--port", str(tracker_port),
               "--interval", "1"]
    with managed_process(tracker, tmp_path / "tracker.log"):
        wait_until(lambda: port_open("127.0.0.1", tracker_port), timeout=30, what="docket-tracker's opentracker")
        try:
            first.start()
            second.start()
            ids = {first.health()["checks"]["instances"]["id"], second.health()["checks"]["instances"]["id"]}
            assert first.health()["checks"]["instances"]["leader"] and not second.health()["checks"]["instances"][
                "leader"]

            digest, info_hash = push(first.url, os.urandom(1_500_000))  # as `docket push` does
            # not degraded while the second catches up (a load balancer would take it out after every push)
            caught_up = requests.get(f"{second.url}/healthz", timeout=10)
            assert caught_up.status_code == 200, {k: v for k, v in caught_up.json()["checks"].items() if not v["ok"]}
            announce = f"http://127.0.0.1:{tracker_port}/announce"
            # the second instance seeds it too, announced once the tracker accepts the hash (each on its address)
            wait_until(lambda: scrape(announce, info_hash).complete == 2, timeout=40, what="two seeders")
            assert [s["digest"] for s in requests.get(f"{second.url}/api/v1/seeders", timeout=10).json()[
                "seeders"]] == [digest]
            assert sorted(p.name for p in (location / "seeders").iterdir()) == sorted(ids)

            assert first.proc is not None
            first.proc.kill()  # SIGKILL: its leadership lock goes with its database connections
            first.proc.wait(timeout=10)
            wait_until(lambda: second.health()["checks"]["instances"]["leader"], timeout=15,
                       what="the second instance to lead")
            health = requests.get(f"{second.url}/healthz", timeout=10)
            assert health.status_code == 200, health.json()

            seeders = location / "seeders"
            left = {p.name for p in seeders.iterdir()} - {second.health()["checks"]["instances"]["id"]}
            assert len(left) == 1 and any((seeders / left.pop()).rglob("ctorrent.pid"))  # its ctorrent runs on
            first.start()  # restarted at once (as systemd would): neither refused nor waiting for the row to age
            assert not first.health()["checks"]["instances"]["leader"]
            # its start-up stopped the ctorrent the killed process left and removed its directory
            assert sorted(p.name for p in seeders.iterdir()) == sorted(
                server.health()["checks"]["instances"]["id"] for server in (first, second))
        finally:
            first.stop()
            second.stop()
            reap_dirs(location / "seeders", set())  # the ctorrents the killed instance left (by their pid files)
