"""Which address our ctorrent listens on (and connects from).

ctorrent drops every peer whose IP equals its own and keeps one connection per remote IP, so two ctorrents on
127.0.0.1 never exchange a byte. When the tracker is on this machine (its host is loopback, or one of this host's
own addresses: a registry here advertising its LAN address, the registry's default), the registry's seeder is on
this machine too, and a ctorrent of ours on the same address would never exchange a byte with it: we then give our
ctorrent a loopback address of its own. ctorrent binds its tracker connection to ``-i``, so the tracker records
that address for us. Otherwise we are a peer on the network that leads to the tracker: ``-i`` is the source
address the kernel picks towards it, so the address the tracker records for us is the one we listen on.
"""

from __future__ import annotations

import ipaddress
import os
import random
from urllib.parse import urlsplit

from docket.errors import InvalidRequest
from docket.netaddr import bindable, is_local_address, resolve_ipv4, route_source


def tracker_host(announce_url: str) -> str:
    return urlsplit(announce_url).hostname or ""


def fresh_loopback_ip(rng: random.Random | None = None, avoid: frozenset[str] = frozenset()) -> str:
    """A 127.X.Y.Z with X >= 1 (so never in 127.0.0.0/24, where seeders usually sit), derived from pid + random.

    Z avoids 0 and 255 so the address never looks like a network or broadcast address.
    """
    rng = rng or random.Random(os.getpid() ^ random.SystemRandom().getrandbits(32))
    pid = os.getpid()
    for _ in range(64):
        x = 1 + (pid + rng.randrange(254)) % 254  # 1..254
        y = rng.randrange(256)
        z = 1 + rng.randrange(254)  # 1..254
        ip = f"127.{x}.{y}.{z}"
        if ip not in avoid and bindable(ip):
            return ip
    raise InvalidRequest("could not find a free loopback address for ctorrent",
                         "give one with --peer-ip 127.X.Y.Z")


def validate_peer_ip(ip: str) -> str:
    """--peer-ip must be a plain IPv4 address (ctorrent has no IPv6)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise InvalidRequest(f"invalid --peer-ip {ip!r}", "give an IPv4 address such as 127.0.0.9") from exc
    if addr.version != 4:
        raise InvalidRequest(f"--peer-ip {ip} is not IPv4", "ctorrent only speaks IPv4")
    if str(addr) == "127.0.0.1":
        # Outgoing peer connections on one host all come from 127.0.0.1 whatever -i says; a ctorrent on
        # 127.0.0.1 takes them for its own and drops them (torrent/INTERFACE.md, Findings).
        raise InvalidRequest("--peer-ip 127.0.0.1 cannot work: same-host peers all connect from 127.0.0.1",
                             "use another loopback address such as 127.0.0.9, or leave --peer-ip out")
    return str(addr)


def choose_peer_ip(announce_url: str, override: str | None = None) -> str | None:
    """The ``-i`` address for our ctorrent: the override; a fresh loopback when the tracker is on this machine
    (same-host ctorrents must not share an IP: module docstring); else our source address towards the tracker
    (None without a route to it: ctorrent's own choice)."""
    if override:
        return validate_peer_ip(override)
    host = tracker_host(announce_url)
    if is_local_address(host):
        return fresh_loopback_ip()
    ip = resolve_ipv4(host)
    return route_source(ip) if ip else None


def loopback_tracker_elsewhere(registry_url: str, announce_url: str) -> str | None:
    """Why BitTorrent cannot work: a registry on another host whose torrents announce to a loopback tracker (it
    was started with --advertise-address 127.0.0.1). None when that is not the case."""
    tracker_ip = resolve_ipv4(tracker_host(announce_url))
    if tracker_ip is None or not ipaddress.IPv4Address(tracker_ip).is_loopback:
        return None
    if is_local_address(tracker_host(registry_url)):
        return None
    return (f"the registry at {registry_url} is on another host, but its torrents announce to the tracker "
            f"{announce_url}, a loopback address: from here that is this host, so no peer can be found. Fix: start "
            "docket-registry with --advertise-address <its LAN address>, or without that flag (it then advertises "
            "the address of its default route)")
