"""Registry configuration: one dataclass with every default, overridden by the CLI or by tests in one line."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from docket.errors import InvalidRequest

GIB = 1024**3
DEFAULT_LOCATION = Path("/var/local/docket")
_HOSTPORT = re.compile(r"\A(?P<host>[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})\Z")


@dataclass(frozen=True)
class RegistryConfig:
    """Everything the registry needs to know; ``with_overrides`` derives variants (tests use a tmp location)."""

    location: Path = DEFAULT_LOCATION
    db_url: str | None = None  # None: sqlite file <location>/docket.db
    tracker: str | None = None  # external opentracker HOST:PORT; None: managed opentracker
    advertise_address: str = "127.0.0.1"  # what peers use to reach this host (seeders, managed tracker)
    tracker_port: int = 6969
    seed_address: str | None = None  # ctorrent -i for seeders; None: see ``seeder_ip``
    bind: str = "0.0.0.0"
    port: int = 8000
    threads: int = 16
    # HTTP server deadlines and pool growth (docket/registry/server.py): slow clients must not hold every thread
    max_threads: int = 256
    header_timeout: float = 10.0
    body_timeout: float = 20.0
    body_min_rate: int = 1024  # bytes per second, averaged over each body_timeout window
    max_upload_size: int = 20 * GIB
    seeding: bool = True  # False: no ctorrent seeders and no tracker process (unit tests with test_client)
    gc_interval: float = 30.0
    gc_grace: float = 600.0
    scrub_interval: float = 3600.0  # seconds between blob re-hashing passes (first at start-up); 0 disables
    upload_session_timeout: float = 3600.0  # seconds a /v2 upload session may stay idle before it is removed
    hash_threads: int = 2  # torf hashing threads per torrent build
    chunk_size: int = 1024 * 1024
    # bearer tokens (repr=False: a logged config must not show them). Push tokens allow everything; read
    # tokens allow GET/HEAD. No push token configured = open pushes; no read token = open reads.
    auth_tokens: tuple[str, ...] = field(default=(), repr=False)
    read_tokens: tuple[str, ...] = field(default=(), repr=False)
    max_header_bytes: int = 16 * 1024  # larger request headers -> 431 (JSON); cheroot's own cap is 64 KiB
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # below this much free space /healthz is degraded and uploads are refused (507); 0 disables (docs: README)
    min_free_space: int = GIB
    # start-up registers blob files the database does not know (a lost or replaced database) instead of refusing
    adopt_orphans: bool = False
    # tag retention (retention.py): the newest keep_tags tags of each repository are kept, plus every tag
    # matching a keep pattern (shell glob); None: no policy. The timer runs every retention_interval s (0: off)
    keep_tags: int | None = None
    keep_patterns: tuple[str, ...] = ()
    retention_interval: float = 3600.0
    # bytes/s for all the seeders together (None: unlimited); docket/torrent/ratelimit.py
    max_upload_rate: int | None = None

    def with_overrides(self, **overrides: object) -> RegistryConfig:
        """A copy with some fields replaced (unknown names raise TypeError)."""
        if "location" in overrides and overrides["location"] is not None:
            overrides["location"] = Path(overrides["location"])  # type: ignore[arg-type]
        return dataclasses.replace(self, **overrides)  # type: ignore[arg-type]

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{Path(self.location).absolute() / 'docket.db'}"

    @property
    def seeder_ip(self) -> str:
        """Address the seeders listen and announce on.

        On loopback a ctorrent must not use 127.0.0.1: outgoing peer connections on one host all come from
        127.0.0.1, so a seeder there drops every same-host leecher as "itself". Seeders then use 127.0.0.2
        (clients on the same host use 127.0.0.3 and up).
        """
        if self.seed_address:
            return self.seed_address
        return "127.0.0.2" if self.advertise_address.startswith("127.") else self.advertise_address


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as the original's ``--tracker`` took it (an http:// prefix and /announce are tolerated)."""
    value = text.strip()
    for prefix in ("http://",):
        if value.startswith(prefix):
            value = value[len(prefix):]
    value = value.removesuffix("/announce").rstrip("/")
    m = _HOSTPORT.match(value)
    if not m or not (0 < int(m.group("port")) < 65536):
        raise InvalidRequest(f"invalid tracker address {text!r}", "give the tracker as HOST:PORT, e.g. 10.0.0.5:6969")
    return m.group("host"), int(m.group("port"))
