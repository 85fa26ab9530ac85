"""docket/netaddr.py: the default address from canned /proc/net/route text and interface lists, and the client's
use of it (peer.py: which -i, and the loopback tracker of a registry on another host). No packet is sent."""

from __future__ import annotations

import ipaddress
from types import SimpleNamespace

import pytest

from docket import netaddr
from docket.client import peer
from docket.client.api import RegistryClient
from docket.client.progress import SilentReporter
from docket.client.pull import PullOptions, Puller

ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth1\t00000000\t010012C6\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010012C6\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth0\t000012C6\t00000000\t0001\t0\t0\t0\t0000FEFF\t0\t0\t0
wg0\t00000000\t00000000\t0000\t0\t0\t0\t00000000\t0\t0\t0
garbage line
"""


def test_default_routes_by_metric_only_up_and_default():
    assert netaddr.default_route_interfaces(ROUTE) == ["eth0", "eth1"]  # wg0's route is not up (flags 0)
    assert netaddr.default_route_interfaces("") == []
    assert netaddr.default_route_interfaces(ROUTE.splitlines()[0]) == []


def test_choose_address():
    addrs = {"lo": "127.0.0.1", "eth0": "198.18.0.5", "eth1": "198.19.0.5"}
    got = netaddr.choose_address(["eth0", "eth1"], addrs)
    assert got.address == "198.18.0.5" and "eth0" in got.why and "default route" in got.why
    # the default route's interface has no IPv4 address: the next default route's
    assert netaddr.choose_address(["tun0", "eth1"], addrs).address == "198.19.0.5"
    # no default route, one non-loopback address: that one
    only = netaddr.choose_address([], {"lo": "127.0.0.1", "eth0": "198.18.0.5"})
    assert only.address == "198.18.0.5" and "only non-loopback" in only.why
    # no default route, several: loopback, and the why says what to do
    several = netaddr.choose_address([], addrs)
    assert several.address == "127.0.0.1" and "--advertise-address" in several.why and "eth1 198.19.0.5" in several.why
    lonely = netaddr.choose_address([], {"lo": "127.0.0.1"})
    assert lonely.address == "127.0.0.1" and "only loopback" in lonely.why


def test_this_host(tmp_path):
    addrs = netaddr.interface_addresses()
    assert addrs.get("lo") == "127.0.0.1"
    assert netaddr.interface_address("no-such-if0") is None
    got = netaddr.default_address()
    assert got.address == "127.0.0.1" or got.address in addrs.values()
    assert netaddr.default_address(tmp_path / "missing").address in {"127.0.0.1", *addrs.values()}
    for a in addrs.values():
        assert netaddr.is_local_address(a)
    assert netaddr.is_local_address("localhost") and netaddr.is_local_address("127.9.9.9")
    assert not netaddr.is_local_address("198.18.255.254")  # TEST-NET (benchmarking) address nobody here has
    assert not netaddr.is_local_address("") and not netaddr.is_local_address("no-such-host.invalid")
    assert netaddr.route_source("127.0.0.5") == "127.0.0.1"
    assert netaddr.resolve_ipv4("127.0.0.7") == "127.0.0.7" and netaddr.resolve_ipv4("::1") is None


def test_loopback_tracker_of_a_registry_elsewhere():
    announce = "http://127.0.0.1:6969/announce"
    why = peer.loopback_tracker_elsewhere("http://198.18.255.254:8000", announce)
    assert why and "--advertise-address" in why and announce in why
    # the registry on this host (loopback or one of our addresses), or a tracker that is not loopback: fine
    assert peer.loopback_tracker_elsewhere("http://127.0.0.1:8000", announce) is None
    for a in netaddr.interface_addresses().values():
        assert peer.loopback_tracker_elsewhere(f"http://{a}:8000", announce) is None
    assert peer.loopback_tracker_elsewhere("http://198.18.255.254:8000", "http://198.18.255.254:6969/a") is None
    assert ipaddress.ip_address(peer.choose_peer_ip(announce)).is_loopback


class _Warnings(SilentReporter):
    def __init__(self) -> None:
        self.lines: list[str] = []

    def warning(self, text: str) -> None:
        self.lines.append(text)


def _transport(tmp_path, mode: str) -> tuple[str, str | None, list[str]]:
    """What the pull starts with against a registry on another host whose torrent announces to 127.0.0.1."""
    rep = _Warnings()
    puller = Puller(RegistryClient("http://198.18.255.254", 8000), None,
                    PullOptions(location=tmp_path, transport=mode, load=False), reporter=rep,
                    scraper=lambda url, ih: pytest.fail("no scrape: the loopback tracker is not this registry's"))
    job = SimpleNamespace(meta=SimpleNamespace(announce="http://127.0.0.1:6969/announce", info_hash="ab" * 20))
    return puller._transport([job]), puller.transfers.fallback_reason, rep.lines  # type: ignore[list-item]


def test_pull_says_it_once_before_the_transfer(tmp_path):
    mode, reason, lines = _transport(tmp_path, "auto")
    assert mode == "http" and reason and "loopback" in reason
    assert len(lines) == 1 and "--advertise-address" in lines[0] and "over HTTP" in lines[0]
    mode, reason, lines = _transport(tmp_path, "p2p")
    assert mode == "p2p" and reason is None and len(lines) == 1 and "anyway" in lines[0]
    mode, reason, lines = _transport(tmp_path, "http")
    assert mode == "http" and reason is None and lines == []
