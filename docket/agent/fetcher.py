"""Blob downloads of the agent: one per digest however many local clients ask, through the pull engine.

A blob with a torrent at the registry comes through the swarm (``Transfers``/``BlobJob`` of client/transfer.py,
the same engine and the same fallback rules as ``docket pull``: HTTP Range from the verified pieces on, once the
swarm gave nothing for ``fallback_after`` seconds or at once when the tracker cannot be reached); a blob without
one comes over HTTP. Every piece is checked as it arrives, and the whole blob against its digest before it is
marked verified (store.py): only a verified blob is ever served, so a corrupt piece never reaches a client.
Finished downloads are handed to the agent's seeder (its own ``SeedDaemon``, through the location's inbox, as a
pull hands its layers over); a blob that came over HTTP is seeded from its verified file.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from docket import errors
from docket.agent.store import AgentStore
from docket.agent.upstream import Upstream
from docket.client.background import Handoff, SeedRequest
from docket.client.cache import atomic_write, blob_lock, ensure_space
from docket.client.digests import digest_algorithm, digest_file
from docket.client.http_fetch import HttpFetch
from docket.client.peer import choose_peer_ip, loopback_tracker_elsewhere
from docket.client.progress import SilentReporter
from docket.client.records import LayerInfo, check_torrent_size
from docket.client.seedd import KEEP_FOR as KEEP_SEEDING  # the agent seeds what it holds while it holds it
from docket.client.seeding import TrackerView
from docket.client.transfer import BlobJob, Transfers
from docket.torrent.engine import TorrentEngine
from docket.torrent.metainfo import read_torrent
from docket.torrent.ratelimit import HostRates

log = logging.getLogger(__name__)

HTTP_PIECE = 4 * 1024 * 1024  # piece length for the resume plan of a blob that has no torrent


@dataclass
class Outcome:
    """One download as the agent's accounting shows it (GET /_docket/agent)."""

    digest: str
    size: int
    via: str = "pending"  # p2p, http, p2p+http, cached, failed
    bytes_from_peers: int = 0
    bytes_from_http: int = 0
    bytes_resumed: int = 0
    started: float = field(default_factory=time.time)
    seconds: float = 0.0
    clients: int = 1  # local requests that shared this download
    error: str | None = None
    fallback_reason: str | None = None


@dataclass
class FetchTotals:
    """Every download since start (``Fetcher.outcomes`` keeps only the last ones), for /metrics."""

    downloads: int = 0  # finished and verified (a blob found in the cache is none)
    failed: int = 0
    bytes_from_peers: int = 0
    bytes_from_http: int = 0  # from the registry


class OwnSeeder(Handoff):
    """The agent's link to its own seeder (the ``SeedDaemon`` running in the agent): requests go through the
    location's inbox like a pull's, but no seeder process is ever started for it, and nothing is remembered."""

    def seed(self, request: SeedRequest) -> None:
        self.files.post({"op": "seed", **asdict(request)})

    def _ensure_running(self) -> None:
        pass


class Fetch:
    """A download in progress; local requests for the same digest wait on it."""

    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome
        self.done = threading.Event()
        self.error: errors.DocketError | None = None


class Fetcher:
    """Starts and shares the agent's blob downloads."""

    def __init__(self, store: AgentStore, upstream: Upstream, engine: TorrentEngine, *, peer_ip: str | None,
                 fallback_after: float = 20.0, stall_timeout: float = 120.0, poll_interval: float = 0.2,
                 rates: HostRates | None = None) -> None:
        self.store = store
        self.upstream = upstream
        self.engine = engine
        self.peer_ip_override = peer_ip
        self.fallback_after = fallback_after
        self.stall_timeout = stall_timeout
        self.poll_interval = poll_interval
        self.rates = rates  # the agent's bandwidth budget (its engines have it too): HTTP fetches take part
        self.tracker = TrackerView()
        self.handoff = OwnSeeder(store.location)
        self.outcomes: list[Outcome] = []  # the last downloads (accounting), newest last
        self.totals = FetchTotals()
        self._fetches: dict[str, Fetch] = {}
        self._peer_ips: dict[str, str | None] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.on_held: Callable[[], None] | None = None  # called after each download (the agent's eviction)

    def peer_ip(self, announce: str) -> str | None:
        """One address per tracker for the agent's whole life (the seeders keep the download's address)."""
        with self._lock:
            if announce not in self._peer_ips:
                self._peer_ips[announce] = choose_peer_ip(announce, self.peer_ip_override)
            return self._peer_ips[announce]

    def get(self, digest: str, size: int, authorization: str | None, timeout: float) -> None:
        """Return once ``digest`` is held and verified (downloading it, or waiting for the download another
        local client started); raise its error otherwise."""
        with self._lock:
            fetch = self._fetches.get(digest)
            if fetch is None:
                fetch = Fetch(Outcome(digest, size))
                self._fetches[digest] = fetch
                threading.Thread(target=self._run, args=(fetch, authorization), name=f"fetch-{digest[7:19]}",
                                 daemon=True).start()
            else:
                fetch.outcome.clients += 1
        if not fetch.done.wait(timeout):
            raise errors.ServiceUnavailable(f"blob {digest} is still downloading after {timeout:g} s",
                                            "retry: the download goes on")
        if fetch.error is not None:
            raise fetch.error

    def stop(self) -> None:
        self._stopping.set()

    # -- one download ----------------------------------------------------------------------------------------
    def _run(self, fetch: Fetch, authorization: str | None) -> None:
        out = fetch.outcome
        start = time.monotonic()
        try:
            with self.store.busy(out.digest):
                self._fetch(out, authorization)
                if self.on_held is not None and out.via != "cached":
                    self.on_held()
        except errors.DocketError as exc:
            fetch.error = exc
        except Exception as exc:  # noqa: BLE001 - the waiting clients get a 5xx, the agent goes on
            log.exception("downloading %s failed", out.digest)
            fetch.error = errors.ServiceUnavailable(f"downloading {out.digest} failed: {type(exc).__name__}: {exc}")
        finally:
            out.seconds = round(time.monotonic() - start, 3)
            if fetch.error is not None:
                out.via, out.error = "failed", fetch.error.message
                log.warning("blob %s: %s", out.digest, fetch.error.message)
            else:
                log.info("blob %s (%d bytes) held: via %s, %d bytes from peers, %d over HTTP, in %.1f s",
                         out.digest, out.size, out.via, out.bytes_from_peers, out.bytes_from_http, out.seconds)
            with self._lock:
                self._fetches.pop(out.digest, None)
                self.outcomes = (self.outcomes + [out])[-1000:]
                self._total(out)
            fetch.done.set()

    def totals_now(self) -> FetchTotals:
        """A copy of the totals, consistent (for /metrics)."""
        with self._lock:
            return replace(self.totals)

    def _total(self, out: Outcome) -> None:
        totals = self.totals  # caller holds self._lock
        if out.via == "failed":
            totals.failed += 1
        elif out.via != "cached":
            totals.downloads += 1
        totals.bytes_from_peers += out.bytes_from_peers  # a failed download's bytes came too
        totals.bytes_from_http += out.bytes_from_http

    def _fetch(self, out: Outcome, authorization: str | None) -> None:
        store = self.store
        workdir = store.workdir(out.digest)
        with blob_lock(workdir / "lock", self.engine, SilentReporter(), out.digest):
            if store.verified(out.digest, out.size) is not None:
                out.via = "cached"
                return
            torrent = self.upstream.torrent(out.digest, authorization)
            blob = store.blob_path(out.digest)
            # a size the disk could not hold even with the cache emptied (a registry's lie: an exabyte) fails here,
            # before evicting anything; one larger than the whole cache does not empty it up front either (after
            # the download, on_held evicts the least recently used down to --cache-size)
            ensure_space(blob.parent, [(blob, max(0, out.size - store.usage()))])
            if out.size <= store.max_bytes:
                store.evict(self._drop, need=out.size)
            ensure_space(blob.parent, [(blob, out.size)])
            if torrent is None:
                self._over_http(out, authorization)
            else:
                self._through_swarm(out, torrent, authorization)
            got = digest_file(blob, digest_algorithm(out.digest))
            if got != out.digest:
                self.handoff.drop([out.digest])
                with contextlib.suppress(FileNotFoundError):
                    blob.unlink()
                self.engine.forget(workdir)
                raise errors.IntegrityError(f"blob {out.digest} downloaded with digest {got}; deleted",
                                            "retry; if it repeats the registry's copy is damaged")
            store.mark_verified(out.digest)

    def _over_http(self, out: Outcome, authorization: str | None) -> None:
        """A blob without a torrent (a config, a blob the registry keeps no torrent for): HTTP only, not seeded."""
        client = self.upstream.blob_client(authorization)
        try:
            fetch = HttpFetch(client, out.digest, out.size, self.store.blob_path(out.digest), HTTP_PIECE, None,
                              rates=self.rates)
            fetch.start()
            self._wait_http(fetch, out)
            out.via, out.bytes_from_http = "http", fetch.received
        finally:
            client.close()

    def _wait_http(self, fetch: HttpFetch, out: Outcome) -> None:
        last, last_at = -1, time.monotonic()
        while not fetch.done.wait(self.poll_interval):
            if fetch.progress > last:
                last, last_at = fetch.progress, time.monotonic()
            elif time.monotonic() - last_at > self.stall_timeout:
                fetch.cancel.set()
                raise errors.TransferError(f"no progress for {self.stall_timeout:g} s downloading {out.digest} "
                                           "over HTTP")
        if fetch.error is not None:
            raise fetch.error

    def _through_swarm(self, out: Outcome, torrent: bytes, authorization: str | None) -> None:
        meta = read_torrent(torrent)
        if meta.length != out.size:
            raise errors.IntegrityError(f"the registry's torrent for {out.digest} describes {meta.length} bytes, "
                                        f"the blob has {out.size}")
        check_torrent_size(torrent, meta.pieces, f"blob {out.digest}")
        workdir = self.store.workdir(out.digest)
        job = BlobJob(LayerInfo(out.digest, out.size, meta.info_hash), meta, torrent, self.store.blob_path(out.digest),
                      workdir)
        client = self.upstream.blob_client(authorization)
        transfers = Transfers(client, self.engine, SilentReporter(), lambda text: log.warning("%s", text),
                              seed_time=KEEP_SEEDING, complete_grace=5.0, fallback_after=self.fallback_after,
                              rates=self.rates, peer_port=None, handoff=self.handoff)
        transfers.ref = out.digest
        mode = "auto"
        reason = loopback_tracker_elsewhere(self.upstream.url, meta.announce)
        if reason is None:
            why = self.tracker.unreachable(meta.announce, meta.info_hash)
            if why:  # once more before a whole blob goes over HTTP: one failed probe under load is not a dead tracker
                time.sleep(1.0)
                why = self.tracker.unreachable(meta.announce, meta.info_hash)
            reason = f"tracker {meta.announce} unreachable ({why})" if why else None
        if reason:
            log.warning("blob %s over HTTP from the registry: %s", out.digest, reason)
            mode, transfers.fallback_reason = "http", reason
        peer_ip = self.peer_ip(meta.announce) if mode != "http" else None
        try:
            transfers.start(job, mode, peer_ip, seed_hours=1)
            last, last_at = -1, time.monotonic()
            while not job.done:
                if self._stopping.is_set():
                    raise errors.ServiceUnavailable("the agent is stopping")
                now = time.monotonic()
                got, _ = transfers.poll(job, now, mode, out.digest, [job])
                if got > last:
                    last, last_at = got, now
                elif now - last_at > self.stall_timeout:
                    raise transfers.transfer_error(job, f"no progress for {self.stall_timeout:g} s downloading "
                                                   f"{out.digest}", "retry; the verified pieces are kept")
                if not job.done:
                    time.sleep(self.poll_interval)
            transfers.join_reseeds([job])
        except BaseException:
            transfers.stop_all([job])
            raise
        finally:
            client.close()
        out.via = job.via
        out.bytes_from_peers, out.bytes_from_http, out.bytes_resumed = (job.bytes_from_peers, job.bytes_from_http,
                                                                         job.resumed)
        out.fallback_reason = job.fallback_reason or transfers.fallback_reason
        if not job.handed_over:  # it came over HTTP (or the hand-over failed): seed the verified file
            atomic_write(job.torrent_path, torrent)
            self.seed(out.digest, out.size, job.torrent_path, peer_ip or self.peer_ip(meta.announce))

    def _drop(self, digests: list[str]) -> None:
        self.handoff.files.post({"op": "drop", "digests": digests})

    def seed(self, digest: str, size: int, torrent: Any, peer_ip: str | None) -> None:
        """Ask the agent's seeder to seed a held blob."""
        with contextlib.suppress(OSError, errors.DocketError):
            self.handoff.seed(SeedRequest(digest=digest, torrent=str(torrent), blob=str(self.store.blob_path(digest)),
                                          workdir=str(self.store.workdir(digest)), deadline=time.time() + KEEP_SEEDING,
                                          listen_ip=peer_ip, size=size, ref="docket agent"))
