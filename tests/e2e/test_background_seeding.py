"""`docket pull` returns once the image is usable; a background seeder per --location seeds on (issue 13).

Real parts: a docket-registry with its opentracker, real ctorrents, the real `docket` command, a real dockerd.
Peers on one host each get their own loopback address (DOCKET_PEER_IP), as hosts would have their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from urllib.parse import quote_from_bytes

import requests

from docket.client.background import SeederFiles
from tests.support.procs import pid_gone, wait_until


def _cli(registry_server, location: Path, *args: str, peer_ip: str) -> list[str]:
    return [sys.executable, "-m", "docket.client.cli", "--host", "http://127.0.0.1", "--port",
            str(registry_server.port), "--location", str(location), *args]


def _env(peer_ip: str) -> dict[str, str]:
    return {**os.environ, "DOCKET_PEER_IP": peer_ip}


def _uploaded_mb(files: SeederFiles) -> int:
    return sum(int(b.get("uploaded_mb", 0)) for b in files.read_state()["blobs"])


class NeedyPeer:
    """A peer that still needs every layer of an image, as the tracker sees it: an announce with bytes left
    (a real tracker entry, no ctorrent: on one host a second downloader would take the registry seeder's one
    connection from 127.0.0.1). "stopped" on exit."""

    def __init__(self, registry_server, ref: str) -> None:
        record = next(r for r in requests.get(f"{registry_server.url}/api/v1/images", timeout=10).json()["images"]
                      if r["ref"] == ref)
        self.layers = [layer for layer in record["layers"] if layer["size"]]
        self.announce = requests.get(f"{registry_server.url}/api/v1/tracker", timeout=10).json()["announce_url"]
        self.peer_id = b"-DKTEST-" + os.urandom(6).hex().encode()

    def _send(self, event: str) -> None:
        for layer in self.layers:
            query = "&".join(f"{k}={quote_from_bytes(v) if isinstance(v, bytes) else v}" for k, v in {
                "info_hash": bytes.fromhex(layer["info_hash"]), "peer_id": self.peer_id, "port": 9, "uploaded": 0,
                "downloaded": 0, "left": layer["size"], "event": event, "compact": 1, "numwant": 0}.items())
            assert requests.get(f"{self.announce}?{query}", timeout=10).ok

    def __enter__(self) -> NeedyPeer:
        self._send("started")
        return self

    def __exit__(self, *exc: object) -> None:
        self._send("stopped")


def test_pull_and_run_return_while_a_second_peer_still_downloads_from_it(registry_server, image_factory, docket_cli,
                                                                       docker_host, tmp_path: Path):
    """`docket pull app && docker run app` returns long before --seed-time while a slower peer is still
    downloading; that peer gets bytes from the first one after its command returned.

    The slow peer starts once the first one has its layers (a ctorrent seeder paces every peer it serves to the
    slowest one, so starting both at once would make the first one slow too).
    """
    ref, marker = image_factory.build(data_mib=8)
    docket_cli("push", ref, registry=registry_server)
    image_factory.remove(ref)  # the first peer pulls it for real
    first, second = tmp_path / "first", tmp_path / "second"
    pull = " ".join(_cli(registry_server, first, "pull", "--seed-time", "120", ref, peer_ip="127.0.0.41"))
    started = time.monotonic()
    deploy = subprocess.Popen(["sh", "-c", f"{pull} && docker run --rm --network none {ref} cat /marker"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**_env("127.0.0.41"), "DOCKER_HOST": docker_host})
    slow = None
    try:
        narrative = []
        for line in deploy.stderr:  # plain progress lines when not a terminal
            narrative.append(line)
            if line.startswith("Verified"):
                break
        slow = subprocess.Popen(_cli(registry_server, second, "pull", "--no-load", "--json", "--transport", "p2p",
                                     "--max-download-rate", "300KiB", "--seed-time", "120", ref, peer_ip="127.0.0.42"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_env("127.0.0.42"))
        out, err = deploy.communicate(timeout=120)
        took = time.monotonic() - started
        narrative.append(err)
        assert deploy.returncode == 0, "".join(narrative)
        assert out.strip().splitlines()[-1] == marker
        assert took < 60, f"pull && run took {took:.1f} s: it waited for --seed-time"
        assert "in the background" in "".join(narrative)
        assert slow.poll() is None, "the second peer finished before the first one returned: no overlap to test"
        files = SeederFiles(first)
        assert files.running()
        at_return = _uploaded_mb(files)
        # the first peer's background seeder sends to the second peer after the command returned
        wait_until(lambda: _uploaded_mb(files) > at_return, timeout=60,
                   what="the first peer's background seeder to upload to the second peer")
        out, err = slow.communicate(timeout=120)
        assert slow.returncode == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        assert summary["bytes_from_http"] == 0 and summary["bytes_from_peers"] > 0
    finally:
        for proc in (deploy, slow):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(30)


def test_seed_list_json_and_stop(registry_server, image_factory, docket_cli, tmp_path: Path):
    """`docket seed --list/--json` shows what the background seeder seeds; `--stop` ends it and its ctorrents."""
    ref, _ = image_factory.build(data_mib=2)
    docket_cli("push", ref, registry=registry_server)
    loc = tmp_path / "client"
    with NeedyPeer(registry_server, ref):  # someone still needs it: no early stop
        out = docket_cli("pull", "--no-load", "--json", "--seed-time", "300", ref, registry=registry_server,
                         location=loc, peer_ip="127.0.0.43")
        assert json.loads(out.stdout)["seeding"] == "background"
        time.sleep(5)  # past the early-stop rule's two scrapes
        state = json.loads(docket_cli("seed", "--json", location=loc).stdout)
        assert state["running"] is True and state["location"] == str(loc)
        layers = {b["digest"]: b for b in state["blobs"]}
        assert layers and all(b["peer"].startswith("127.0.0.43:") and b["seconds_left"] > 200
                              for b in layers.values())
        pids = [b["pid"] for b in layers.values()]
        assert all(not pid_gone(pid) for pid in pids)
        listing = docket_cli("seed", "--list", location=loc)
        assert all(digest.split(":")[1][:12] in listing.stdout for digest in layers)
        assert ref in listing.stdout and "LEFT" in listing.stdout
        # the next pull of this location hands its layers to the same seeder instead of starting another
        other, _ = image_factory.build(data_mib=1)
        docket_cli("push", other, registry=registry_server)
        with NeedyPeer(registry_server, other):
            docket_cli("pull", "--no-load", "--seed-time", "300", other, registry=registry_server, location=loc,
                       peer_ip="127.0.0.43")
            wait_until(lambda: {b["ref"] for b in SeederFiles(loc).read_state()["blobs"]} == {ref, other},
                       timeout=10, what="the second image's layers in the same seeder")
        state = json.loads(docket_cli("seed", "--json", location=loc).stdout)
        assert state["pid"] == SeederFiles(loc).daemon_pid()
        pids = [b["pid"] for b in state["blobs"]]
        stopped = docket_cli("seed", "--stop", location=loc)
        assert f"pid {state['pid']}" in stopped.stdout
        assert pid_gone(state["pid"]) and all(pid_gone(pid) for pid in pids)
        assert json.loads(docket_cli("seed", "--json", location=loc).stdout) == {
            "running": False, "location": str(loc), "blobs": []}
        again = docket_cli("seed", "--stop", location=loc)
        assert again.returncode == 0 and "No background seeder" in again.stderr
    bad = docket_cli("seed", "--list", "--stop", location=loc, check=False)
    assert bad.returncode == 2 and "not both" in bad.stderr


def test_no_process_left_after_seed_time_or_a_removed_cache(registry_server, image_factory, docket_cli,
                                                            tmp_path: Path):
    """Seeding ends at --seed-time even while a peer still downloads; removing the cache ends it at once."""
    ref, _ = image_factory.build(data_mib=2)
    docket_cli("push", ref, registry=registry_server)
    timed, removed = tmp_path / "timed", tmp_path / "removed"
    with NeedyPeer(registry_server, ref):
        started = time.monotonic()
        docket_cli("pull", "--no-load", "--seed-time", "6", ref, registry=registry_server, location=timed,
                   peer_ip="127.0.0.46")
        docket_cli("pull", "--no-load", "--seed-time", "300", ref, registry=registry_server, location=removed,
                   peer_ip="127.0.0.47")
        timed_state = SeederFiles(timed).read_state()
        removed_state = SeederFiles(removed).read_state()
        assert timed_state["running"] and removed_state["running"]
        wait_until(lambda: SeederFiles(removed).read_state()["blobs"], timeout=10, what="the seeder's state")
        seeding = [b["pid"] for b in SeederFiles(removed).read_state()["blobs"]]
        shutil.rmtree(removed)  # `rm -rf ~/.cache/docket`
        wait_until(lambda: pid_gone(removed_state["pid"]) and all(pid_gone(p) for p in seeding), timeout=15,
                   what="the seeder of a removed cache to end with its ctorrents")
        wait_until(lambda: not SeederFiles(timed).running(), timeout=30, what="the seeder to end at --seed-time")
        took = time.monotonic() - started
        assert 6 <= took < 30
        wait_until(lambda: pid_gone(timed_state["pid"]), timeout=5, what="the process, a moment after its lock")
        log = (timed / "seeder" / "seeder.log").read_text()
        assert "its seed time ended" in log and "no peer still downloads it" not in log
    pids = [int(p.read_text()) for p in timed.glob("torrents/*/ctorrent.pid")]
    assert all(pid_gone(pid) for pid in pids)


def test_wait_seeds_in_the_foreground(registry_server, image_factory, docket_cli, tmp_path: Path):
    """--wait: today's behaviour for scripts that want it: the command seeds itself, no background seeder."""
    ref, _ = image_factory.build(data_mib=2)
    docket_cli("push", ref, registry=registry_server)
    loc = tmp_path / "client"
    with NeedyPeer(registry_server, ref):
        started = time.monotonic()
        out = docket_cli("pull", "--no-load", "--json", "--wait", "--seed-time", "4", ref, registry=registry_server,
                         location=loc, peer_ip="127.0.0.49")
        assert time.monotonic() - started >= 4
    assert json.loads(out.stdout)["seeding"] == "foreground"
    assert not SeederFiles(loc).log.exists() and not SeederFiles(loc).running()
