"""This host's addresses, found without flags and without sending a packet.

The registry advertises ``default_address()`` (what other hosts reach it at) unless told otherwise; the client asks
``is_local_address`` (is the tracker on this machine?) and ``route_source`` (which of our addresses faces it).
Interfaces are read from ``/proc/net/route`` and ``ioctl(SIOCGIFADDR)``: no process is spawned. The decision
itself (``choose_address``) is pure, so it is tested with canned text.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import socket
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"
SIOCGIFADDR = 0x8915  # linux/sockios.h
RTF_UP = 0x0001  # linux/route.h


@dataclass(frozen=True)
class DefaultAddress:
    """The address and, for the log line, why it was chosen."""

    address: str
    why: str


def default_route_interfaces(route_text: str) -> list[str]:
    """The interfaces of the IPv4 default routes in ``/proc/net/route`` text, lowest metric first."""
    routes: list[tuple[int, str]] = []
    for line in route_text.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            dest, flags, metric, mask = int(f[1], 16), int(f[3], 16), int(f[6]), int(f[7], 16)
        except ValueError:
            continue
        if dest == 0 and mask == 0 and flags & RTF_UP:
            routes.append((metric, f[0]))
    return [name for _, name in sorted(routes)]


def choose_address(default_ifaces: list[str], addresses: Mapping[str, str]) -> DefaultAddress:
    """The default route's interface's address, else the only non-loopback one, else 127.0.0.1.

    ``addresses`` maps interface name -> its IPv4 address (interfaces without one left out)."""
    for name in default_ifaces:
        if name in addresses:
            return DefaultAddress(addresses[name], f"{name}, the default route's interface")
    others = {n: a for n, a in addresses.items() if not ipaddress.IPv4Address(a).is_loopback}
    if len(others) == 1:
        (name, addr), = others.items()
        return DefaultAddress(addr, f"{name}, this host's only non-loopback address")
    if not others:
        return DefaultAddress(LOOPBACK, "this host has only loopback addresses: other hosts cannot reach it")
    listed = ", ".join(f"{n} {a}" for n, a in sorted(others.items()))
    return DefaultAddress(LOOPBACK, f"no default route and several addresses ({listed}): "
                                    "pass --advertise-address with the one other hosts reach")


def interface_address(name: str) -> str | None:
    """The IPv4 address of interface ``name`` (SIOCGIFADDR), None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            res = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(res[20:24])


def interface_addresses() -> dict[str, str]:
    out: dict[str, str] = {}
    for _, name in socket.if_nameindex():
        addr = interface_address(name)
        if addr is not None:
            out[name] = addr
    return out


def default_address(route_file: Path = Path("/proc/net/route")) -> DefaultAddress:
    """The address this host is reached at: see ``choose_address``."""
    text = ""
    with contextlib.suppress(OSError):
        text = route_file.read_text()
    return choose_address(default_route_interfaces(text), interface_addresses())


def resolve_ipv4(host: str) -> str | None:
    """``host`` (a name or IPv4 literal) -> its first IPv4 address; None when it does not resolve."""
    if not host:
        return None
    with contextlib.suppress(ValueError):
        addr = ipaddress.ip_address(host)
        return str(addr) if addr.version == 4 else None
    try:
        infos = socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        return None
    return str(infos[0][4][0]) if infos else None


def is_local_address(host: str) -> bool:
    """True when ``host`` resolves to an address of this machine: loopback, or one we can bind."""
    ip = resolve_ipv4(host)
    if ip is None:
        return False
    return ipaddress.IPv4Address(ip).is_loopback or bindable(ip)


def route_source(ip: str) -> str | None:
    """The source address the kernel picks for ``ip`` (a UDP connect sends nothing); None without a route."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, 9))
        except OSError:
            return None
        return str(s.getsockname()[0])


def bindable(ip: str) -> bool:
    """True when a socket can bind ``ip``: it is an address of this machine (or in 127.0.0.0/8)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError:
            return False
    return True
