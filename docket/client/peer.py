"""Which address our ctorrent listens on (and connects from).

ctorrent drops every peer whose IP equals its own and keeps one connection per remote IP, so two ctorrents on
127.0.0.1 never exchange a byte. When the tracker is on this machine (its host resolves to loopback), the
registry's seeder is on this machine too: we then give our ctorrent a loopback address of its own. ctorrent
binds its tracker and peer connections to ``-i``, so the tracker records that address for us.
"""

from __future__ import annotations

import ipaddress
import os
import random
import socket
from urllib.parse import urlsplit

from docket.errors import InvalidRequest


def host_is_loopback(host: str) -> bool:
    """True when ``host`` (a name or IPv4 literal) resolves to a 127.0.0.0/8 address."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        return False
    return any(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def tracker_host(announce_url: str) -> str:
    return urlsplit(announce_url).hostname or ""


def _bindable(ip: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True


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
        if ip not in avoid and _bindable(ip):
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
    """The ``-i`` address for our ctorrent: the override, a fresh loopback when the tracker is local, else None."""
    if override:
        return validate_peer_ip(override)
    if host_is_loopback(tracker_host(announce_url)):
        return fresh_loopback_ip()
    return None
