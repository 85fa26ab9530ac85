"""``docket agent``: one long-running process per host, serving /v2 reads to the local dockerd, containerd or
kubelet, fetching blobs through the swarm and seeding everything it holds.

``Agent`` puts the parts together: the cache (store.py), the registry (upstream.py), the downloads (fetcher.py),
and the seeder of its cache location, which is the background seeder's own loop (client/seedd.py ``SeedDaemon``)
run in keep mode in a thread of the agent. Holding that location's seeder lock makes the agent *the* seeder of
the location: a ``docket pull`` of the same location hands its layers to the agent (client/background.py) instead
of starting a seeder of its own, and the agent serves what the pull fetched. ``serve`` runs it behind the
registry's HTTP server (cheroot with slow-client deadlines) until SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docket import errors
from docket.agent.fetcher import Fetcher
from docket.agent.heartbeat import Heartbeat, default_host_id
from docket.agent.store import AgentStore
from docket.agent.upstream import Upstream
from docket.client import background
from docket.client.background import SeederFiles
from docket.client.seedd import SeedDaemon
from docket.torrent.bandwidth import RateLimits
from docket.torrent.ctorrent_engine import CtorrentEngine
from docket.torrent.engine import TorrentEngine
from docket.torrent.metainfo import read_torrent
from docket.torrent.ratelimit import HostRates

log = logging.getLogger(__name__)

MAX_SEEDERS = 1024  # blobs seeded at once; past it, the seeder stops the one it started first


@dataclass
class AgentConfig:
    registry: str  # base URL, e.g. http://registry.internal:8000
    cache_dir: Path
    cache_size: int
    listen_host: str = "127.0.0.1"
    listen_port: int = 5000
    token: str | None = field(default=None, repr=False)
    ca_bundle: str | None = None
    peer_ip: str | None = None
    fallback_after: float = 20.0
    stall_timeout: float = 120.0
    blob_timeout: float = 3600.0  # seconds a local GET waits for its blob's download
    max_download_rate: int | None = None  # bytes/s for all the agent's downloads together (ratelimit.py)
    max_upload_rate: int | None = None  # bytes/s for all its uploads together
    threads: int = 16
    max_threads: int = 256
    seed_engine: str = "libtorrent"  # "libtorrent": one in-process session seeds every blob; "ctorrent": a process each
    heartbeat_interval: float = 5.0  # seconds between heartbeats to the registry (agent/heartbeat.py); 0: none
    host_id: str | None = None  # None: this machine's host name


class Agent:
    def __init__(self, config: AgentConfig, engine: TorrentEngine | None = None) -> None:
        self.config = config
        self.rates = HostRates(RateLimits(upload=config.max_upload_rate, download=config.max_download_rate))
        self.engine = engine or CtorrentEngine(tied=True, rates=self.rates)
        self.store = AgentStore(config.cache_dir, config.cache_size)
        self.upstream = Upstream(config.registry, token=config.token, ca_bundle=config.ca_bundle)
        self.seed_engine = self._seed_engine(config.seed_engine, engine)
        self.seeder = SeedDaemon(SeederFiles(self.store.location), engine=self.seed_engine, keep=True,
                                 max_seeders=MAX_SEEDERS)
        self.fetcher = Fetcher(self.store, self.upstream, self.engine, peer_ip=config.peer_ip,
                               fallback_after=config.fallback_after, stall_timeout=config.stall_timeout,
                               rates=self.rates)
        self.fetcher.on_held = self.evict
        self.started = time.time()
        self.counters: dict[str, int] = {"blobs_served": 0, "bytes_served": 0, "manifests_fetched": 0,
                                         "manifests_cached": 0}
        self._lock = threading.Lock()
        self._seeder_thread: threading.Thread | None = None
        self.heartbeat = Heartbeat(self, config.host_id or default_host_id(), config.heartbeat_interval)

    def _seed_engine(self, name: str, engine: TorrentEngine | None) -> TorrentEngine:
        if name == "ctorrent" or engine is not None:
            return self.engine
        from docket.torrent import libtorrent_engine

        if not libtorrent_engine.available():
            log.warning("libtorrent is not installed (pip install libtorrent): every held blob is seeded by a "
                        "ctorrent process of its own")
            return self.engine
        return libtorrent_engine.LibtorrentSeedEngine(rates=self.rates)  # type: ignore[return-value]

    # -- life ------------------------------------------------------------------------------------------------
    def start(self) -> None:
        if not self.seeder.take_lock():
            self._take_over()
        self._seeder_thread = threading.Thread(target=self.seeder.run, name="seeder", daemon=True)
        self._seeder_thread.start()
        self.evict()
        threading.Thread(target=self._restore, name="restore", daemon=True).start()
        self.heartbeat.start()

    def _take_over(self) -> None:
        """The location's background seeder (a `docket pull`'s) runs: stop it and seed its blobs ourselves (they
        are in the cache: ``_restore`` hashes them once). Another agent is refused."""
        files = self.seeder.files
        with contextlib.suppress(OSError):
            if files.pid.read_text().split()[1:2] == ["agent"]:
                raise errors.DocketError(f"another docket agent runs on {self.store.location}",
                                         "stop it, or give this agent another --cache-dir")
        log.info("stopping the background seeder of %s: the agent seeds what the cache holds", self.store.location)
        background.stop(self.store.location)
        if not self.seeder.take_lock():
            raise errors.DocketError(f"another process holds {files.lock}",
                                     "stop it (`docket seed --stop`), or give this agent another --cache-dir")

    def _restore(self) -> None:
        """Seed again what the cache holds (after a restart, or what pulls left): every blob that has a torrent
        and verifies (a blob without our record, e.g. a pull's, is hashed once)."""
        count = 0
        for held in self.store.held(check=True):
            try:
                meta = read_torrent(held.torrent.read_bytes())
            except (OSError, ValueError):
                continue  # no torrent (a config): served, not seeded
            if meta.length != held.size:
                continue
            self.fetcher.seed(held.digest, held.size, held.torrent, self.fetcher.peer_ip(meta.announce))
            count += 1
        if count:
            log.info("seeding the %d blob(s) the cache held again", count)

    def stop(self) -> None:
        self.heartbeat.stop()
        self.fetcher.stop()
        self.seeder.term.set()
        if self._seeder_thread is not None:
            self._seeder_thread.join(timeout=30)
        self.rates.close()
        close = getattr(self.seed_engine, "close", None)
        if close is not None:
            close()
        self.upstream.close()

    def healthy(self) -> bool:
        return self._seeder_thread is not None and self._seeder_thread.is_alive()

    # -- accounting ------------------------------------------------------------------------------------------
    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self.counters[key] = self.counters.get(key, 0) + n

    def counted(self) -> dict[str, int]:
        """A copy of the counters (for /metrics)."""
        with self._lock:
            return dict(self.counters)

    def served(self, digest: str, nbytes: int) -> None:
        with self._lock:
            self.counters["blobs_served"] += 1
            self.counters["bytes_served"] += nbytes

    def evict(self) -> None:
        """Bring the cache back under --cache-size (the store runs one pass at a time)."""
        try:
            self.store.evict(lambda digests: self.seeder.files.post({"op": "drop", "digests": digests}))
        except OSError as exc:
            log.warning("eviction failed: %s", exc)

    def status(self) -> dict[str, Any]:
        """GET /_docket/agent: what came from where, what is seeded, the cache."""
        outcomes = list(self.fetcher.outcomes)
        seeding = list(self.seeder.seeding.values())
        with self._lock:
            counters = dict(self.counters)
        return {
            "pid": os.getpid(),
            "registry": self.upstream.url,
            "cache_dir": str(self.store.location),
            "cache_size": self.config.cache_size,
            "cache_used": self.store.usage(),
            "uptime": round(time.time() - self.started, 1),
            "blobs": [vars(o) for o in outcomes],
            "seeding": [{"digest": s.request.digest, "size": s.request.size, "ref": s.request.ref,
                         "peer": f"{s.request.listen_ip or '*'}:{s.transfer.listen_port or s.request.port or '?'}",
                         "pid": s.transfer.pid, "uploaded_mb": s.transfer.status.uploaded_mb if s.transfer.status
                         else 0} for s in seeding],
            "totals": {
                **counters,
                "downloads": sum(1 for o in outcomes if o.via != "cached"),  # a pull's blob hashed once is none
                "bytes_from_peers": sum(o.bytes_from_peers for o in outcomes),
                "bytes_from_http": sum(o.bytes_from_http for o in outcomes),
                "bytes_resumed": sum(o.bytes_resumed for o in outcomes),
                "seeding": len(seeding),
            },
        }


def serve(config: AgentConfig) -> None:
    """Bind, start the seeder, serve until SIGTERM/SIGINT, then stop everything (its ctorrents die with it)."""
    from docket.agent.app import create_app
    from docket.registry.server import Deadlines, Server, run_until_signalled

    agent = Agent(config)
    app = create_app(agent)
    # a blob download waits before its first byte: the response deadlines only count once bytes flow
    server = Server((config.listen_host, config.listen_port), app, deadlines=Deadlines(),
                    min_threads=config.threads, max_threads=config.max_threads, server_name="docket-agent",
                    shutdown_timeout=10, request_queue_size=1024)

    def started() -> None:
        log.info("docket agent serving /v2 on http://%s:%d for the registry at %s (cache %s, at most %d bytes)",
                 config.listen_host, config.listen_port, config.registry, config.cache_dir, config.cache_size)

    def broken() -> str | None:
        return None if agent.healthy() else f"its seeder stopped ({config.cache_dir} was removed?)"

    run_until_signalled(server, name="docket agent", bind=config.listen_host, port=config.listen_port,
                        start=agent.start, stop=agent.stop, started=started, broken=broken)
