"""Addresses without flags (issue 13), for real, in network namespaces (tests/support/netns.py; 198.18.0.0/15).

- A registry started without --advertise-address advertises its host's address (logged), and a client on another
  host with no address flag pulls over BitTorrent; so does a client on the registry's own host.
- default_address() on a host with a default route and two interfaces, with two and no route, with only loopback.
- A registry advertising a loopback tracker to a client on another host: one plain warning before the download,
  then HTTP at once (not after the 20 s fallback).
Needs root, iproute2, curl, ctorrent, opentracker; under CI=true a missing tool fails instead of skipping.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from docket.torrent.metainfo import read_torrent
from tests.support.netns import Lab, require_netns
from tests.support.procs import stop_process, tail, wait_until
from tests.support.registry_images import build_image_tar
from tests.support.robustness_rows import record

REG_IP, CL_IP = "198.18.0.1", "198.18.0.2"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_netns("address e2e")
    with Lab("dkad", {"reg": REG_IP, "cl": CL_IP}) as lab:
        yield lab


def _curl(lab: Lab, host: str, *args: str) -> subprocess.CompletedProcess:
    return lab.run(host, ["curl", "-sS", "--noproxy", "*", "-m", "10", "-f", *args], timeout=30)


def _registry(lab: Lab, tmp: Path, port: int, *flags: str) -> tuple[subprocess.Popen, Path]:
    """docket-registry on host reg (no --bind: all of that host's addresses), answering /healthz from host cl."""
    log = tmp / f"registry-{port}.log"
    proc = lab.spawn("reg", [str(BIN / "docket-registry"), "--port", str(port), "--tracker-port", str(port + 1),
                             "--location", str(tmp / f"registry-{port}"), *flags], log)
    wait_until(lambda: proc.poll() is not None
               or _curl(lab, "cl", f"http://{REG_IP}:{port}/healthz").returncode == 0, timeout=60,
               what="docket-registry to answer /healthz")
    assert proc.poll() is None, tail(log)
    return proc, log


def _push(lab: Lab, tmp: Path, port: int, repo: str) -> dict:
    tar = tmp / f"{repo.replace('/', '_')}.tar"
    build_image_tar(tar, payload=os.urandom(2 << 20), repo_tag=f"{repo}:v1")
    r = _curl(lab, "reg", "-X", "PUT", "-H", "Content-Type: application/x-tar", "--data-binary", f"@{tar}",
              f"http://{REG_IP}:{port}/api/v1/repositories/{repo}/tags/v1")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _pull(lab: Lab, host: str, tmp: Path, port: int, repo: str, *flags: str) -> tuple[dict, str, float]:
    t0 = time.monotonic()
    r = lab.run(host, [str(BIN / "docket"), "--host", f"http://{REG_IP}", "--port", str(port), "--location",
                       str(tmp / f"{host}-{port}"), "pull", f"{repo}:v1", "--no-load", "--json", "--seed-time", "0",
                       *flags], timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr, took


@pytest.mark.timeout(90)
def test_registry_without_the_flag_advertises_its_address(lab: Lab, tmp_path: Path) -> None:
    port = 8100
    registry, log = _registry(lab, tmp_path, port)
    try:
        text = log.read_text()
        assert f"advertise address {REG_IP} (eth0, this host's only non-loopback address); " \
               "--advertise-address overrides" in text, tail(log)
        assert "is a loopback address" not in text, tail(log)
        pushed = _push(lab, tmp_path, port, "addr/app")
        digest = pushed["layers"][0]["digest"]
        torrent = _curl(lab, "cl", "-o", str(tmp_path / "t.torrent"),
                        f"http://{REG_IP}:{port}/api/v1/blobs/{digest}/torrent")
        assert torrent.returncode == 0, torrent.stderr
        assert read_torrent((tmp_path / "t.torrent").read_bytes()).announce == f"http://{REG_IP}:{port + 1}/announce"

        # another host, no address flag: a peer on its own address, every byte through BitTorrent
        summary, err, took = _pull(lab, "cl", tmp_path, port, "addr/app")
        assert f"through BitTorrent as peer {CL_IP}" in err, err
        assert summary["transport"] == "p2p" and summary["bytes_from_http"] == 0, summary
        assert summary["bytes_from_peers"] > 0 and summary["fallback_reason"] is None, summary
        # the registry's own host: a fresh loopback address, still BitTorrent (the seeder is on the LAN address)
        same, err2, took2 = _pull(lab, "reg", tmp_path, port, "addr/app")
        assert "through BitTorrent as peer 127." in err2, err2
        assert same["transport"] == "p2p" and same["bytes_from_peers"] > 0, same
        record("addresses", "registry without --advertise-address, clients with no address flag",
               f"advertised {REG_IP} (logged with why); a pull from another host {took:.1f}s and one on the "
               f"registry's host {took2:.1f}s, all bytes through BitTorrent")
    finally:
        stop_process(registry, timeout=30)


@pytest.mark.timeout(60)
def test_loopback_tracker_of_a_registry_on_another_host(lab: Lab, tmp_path: Path) -> None:
    port = 8200
    registry, log = _registry(lab, tmp_path, port, "--advertise-address", "127.0.0.1")
    try:
        assert "is a loopback address" in log.read_text(), tail(log)
        _push(lab, tmp_path, port, "loop/app")
        summary, err, took = _pull(lab, "cl", tmp_path, port, "loop/app")
        lines = err.splitlines()
        warned = [i for i, line in enumerate(lines) if "a loopback address" in line]
        assert len(warned) == 1, err
        started = next(i for i, line in enumerate(lines) if line.startswith("Downloading 1 layer"))
        assert warned[0] < started, err
        assert "--advertise-address" in lines[warned[0]] and "over HTTP" in lines[warned[0]], err
        assert summary["transport"] == "http" and summary["bytes_from_peers"] == 0, summary
        assert "loopback" in summary["fallback_reason"], summary
        assert took < 10, took  # straight to HTTP, not after the 20 s fallback
        record("addresses", "registry advertising 127.0.0.1 to a client on another host",
               f"one warning before the download (what, why, the fix), then HTTP at once: {took:.1f}s")
    finally:
        stop_process(registry, timeout=30)


DEFAULT_ADDRESS = "from docket.netaddr import default_address; a = default_address(); print(a.address); print(a.why)"


@pytest.mark.timeout(60)
def test_default_address_in_namespaces() -> None:
    require_netns("address e2e")
    tag = f"dkda{os.getpid()}"
    names = {k: f"{tag}-{k}" for k in ("route", "noroute", "lo")}

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def two_interfaces(ns: str) -> None:
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        for k, (name, peer_name, addr) in enumerate((("eth0", "peer0", "198.18.1.1/24"),
                                                     ("eth1", "peer1", "198.18.2.1/24"))):
            ip("-n", ns, "link", "add", name, "type", "veth", "peer", "name", peer_name)
            ip("-n", ns, "addr", "add", addr, "dev", name)
            ip("-n", ns, "link", "set", peer_name, "up")
            ip("-n", ns, "link", "set", name, "up")

    def default_address(ns: str) -> list[str]:
        r = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", DEFAULT_ADDRESS], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout.splitlines()

    try:
        two_interfaces(names["route"])
        # the default route leaves by eth1 (the second interface), via a gateway that need not exist
        ip("-n", names["route"], "route", "add", "default", "via", "198.18.2.254", "dev", "eth1")
        assert default_address(names["route"]) == ["198.18.2.1", "eth1, the default route's interface"]
        two_interfaces(names["noroute"])
        address, why = default_address(names["noroute"])
        assert address == "127.0.0.1" and "--advertise-address" in why and "eth0 198.18.1.1" in why, why
        ip("netns", "add", names["lo"])
        ip("-n", names["lo"], "link", "set", "lo", "up")
        address, why = default_address(names["lo"])
        assert address == "127.0.0.1" and "only loopback" in why, why
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
    record("addresses", "default advertise address",
           "default route's interface's address; without a route the only non-loopback one; several and no route, "
           "or only loopback: 127.0.0.1 with a why (the former names --advertise-address)")
