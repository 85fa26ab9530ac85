"""The pull engine: a pull is a plan (the blobs to fetch, and how to load them) run by one loop of blob jobs.

1. ``plan``: the image record (records.py), the config over HTTP and checked, the layers Docker already has
   skipped, each missing blob's torrent fetched and checked (also over HTTP: its piece hashes check a resumed
   file), the sink chosen (``docker load`` stream, ``-o`` file, or neither with ``--no-load``).
2. ``run``: every blob's lock held (cache.py); verified blobs in the cache are kept; the others go through
   ``_download`` (one loop over ``BlobJob``s, MAX_TRANSFERS at a time: transfer.py) and are verified.
3. The load tarball is generated from the cache (layers.py) into the sink. Each blob seeds from the moment its
   download finished: by default in the background seeder of the location (``handoff``: background.py,
   seedd.py), so the pull returns once the image is usable; with ``--wait`` in this process, until each blob's
   ``SeedPolicy`` (seeding.py) says nobody needs it.

No click here: the CLI passes a ``Reporter`` (progress.py) and reads the returned ``PullResult``.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from docket import errors
from docket.client.api import RegistryClient
from docket.client.background import Handoff
from docket.client.cache import (blob_lock, cache_dir, check_output_path, ensure_dir, ensure_space, unlink_link,
                                 write_output)
from docket.client.digests import digest_algorithm, digest_file, empty_digest
from docket.client.dockerops import DockerOps
from docket.client.layers import LoadEntry, load_entries, present_prefix, tar_stream
from docket.client.peer import choose_peer_ip, loopback_tracker_elsewhere
from docket.client.progress import Reporter, SilentReporter
from docket.client.records import (MAX_CONFIG, LayeredRecord, LayerInfo, check_config, check_layer_torrent,
                                   check_torrent_size, image_record)
from docket.client.seeding import SeedPolicy, TrackerView
from docket.client.transfer import BlobJob, Transfers, bitfield_bytes
from docket.reference import Reference
from docket.torrent.bandwidth import RateLimits
from docket.torrent.ctorrent_engine import CtorrentEngine
from docket.torrent.engine import TorrentEngine
from docket.torrent.metainfo import TorrentMeta, read_torrent
from docket.torrent.ratelimit import HostRates

TRANSPORTS = ("auto", "p2p", "http")
DEFAULT_FALLBACK_AFTER = 20.0  # s without swarm progress; ctorrent retries a failed tracker announce every ~15 s
MAX_TRANSFERS = 3  # blobs downloading at once (BitTorrent or HTTP), as docker's max-concurrent-downloads
MAX_TORRENT_TOTAL = 256 * 1024 * 1024  # the torrents of one pull, held in memory (1,000 layers: ~40 MB at most)


@dataclass
class PullOptions:
    location: Path
    peer_ip: str | None = None
    peer_port: int | None = None
    stall_timeout: float = 120.0
    seed_time: float = 60.0
    load: bool = True
    output: Path | None = None
    poll_interval: float = 0.25
    scrape_interval: float = 2.0
    complete_grace: float = 5.0  # all pieces present but no "Download complete." line: trust it after this
    max_download_rate: int | None = None  # bytes/s for all of this pull's downloads together; None: unlimited
    max_upload_rate: int | None = None  # bytes/s for all its uploads, and the background seeder it starts
    transport: str = "auto"  # "auto" | "p2p" | "http" (transfer.py)
    fallback_after: float = DEFAULT_FALLBACK_AFTER  # auto: seconds without swarm progress before HTTP takes over

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise errors.InvalidRequest(f"unknown transport {self.transport!r}", "use auto, p2p or http")
        if self.fallback_after < 0:
            raise errors.InvalidRequest("--fallback-after must not be negative")


@dataclass
class PullResult:
    ref: str
    digest: str
    image_id: str
    bytes: int
    seconds: float
    loaded: bool
    output: str | None
    peer_ip: str | None = None
    tracker: str | None = None
    format: str = "layers"
    extra: dict[str, Any] = field(default_factory=dict)  # bytes_from_peers, bytes_from_http, transport, ...

    def summary(self) -> dict[str, Any]:
        """The --json keys (README, "docket pull")."""
        out = {"ref": self.ref, "digest": self.digest, "image_id": self.image_id, "bytes": self.bytes,
               "seconds": self.seconds, "loaded": self.loaded, "output": self.output, "format": self.format}
        out.update(self.extra)
        return out


@dataclass
class PullPlan:
    """What one pull fetches and how it loads it."""

    record: LayeredRecord
    config: bytes
    diff_ids: list[str]
    present: int  # leading layers Docker already has
    bytes_present: int
    empty: list[LayerInfo]  # 0-byte layers: nothing to fetch
    jobs: list[BlobJob]  # one per distinct missing blob, in the image's order
    blobs_dir: Path
    load: bool
    output: Path | None

    def entries(self) -> list[LoadEntry]:
        """The legacy ``docker load`` tarball's members, read from the cache."""
        blobs = {layer.diff_id: self.blobs_dir / layer.hex for layer in self.empty}
        blobs.update({j.layer.diff_id: j.blob for j in self.jobs})
        return load_entries(str(self.record.ref), self.record.config_digest, self.config, self.diff_ids, blobs)


class Puller:
    """One pull. ``docker`` may be None with ``load=False``; ``engine`` defaults to ctorrent (processes tied to
    this one), ``scraper(announce, info_hash)`` to a real tracker scrape (tests pass doubles)."""

    def __init__(self, api: RegistryClient, docker: DockerOps | None, options: PullOptions,
                 reporter: Reporter | None = None, engine: TorrentEngine | None = None,
                 scraper: Callable[[str, str], Any] | None = None, handoff: Handoff | None = None) -> None:
        self.api = api
        self.docker = docker
        self.opts = options
        self.reporter = reporter or SilentReporter()
        self.rates = HostRates(RateLimits(upload=options.max_upload_rate, download=options.max_download_rate))
        self.engine = engine or CtorrentEngine(tied=True, rates=self.rates)
        self.tracker = TrackerView(scraper)
        self.handoff = handoff if options.seed_time > 0 else None
        o = options
        self.transfers = Transfers(api, self.engine, self.reporter, self.warn, seed_time=o.seed_time,
                                   complete_grace=o.complete_grace, fallback_after=o.fallback_after,
                                   rates=self.rates, peer_port=o.peer_port,
                                   handoff=self.handoff)
        self.jobs: list[BlobJob] = []

    def warn(self, text: str) -> None:
        """A warning line (the reporter's ``warning`` when it has one)."""
        warning = getattr(self.reporter, "warning", None)
        if warning is not None:
            warning(text)
        else:
            self.reporter.info(f"Warning: {text}")

    def pull(self, ref: Reference) -> PullResult:
        start = time.monotonic()
        if self.opts.output:  # before any download, not after it
            self.opts.output = check_output_path(self.opts.output)
        self.reporter.info(f"Pulling {ref} from the Docket registry at {self.api.url}")
        plan = self.plan(ref)
        self.transfers.ref = str(plan.record.ref)
        try:
            return self.run(plan, start)
        except BaseException:
            if self.handoff is not None:  # Ctrl-C or a failure: what this pull handed over stops too
                self.handoff.withdraw()
            raise
        finally:
            self.transfers.stop_all(self.jobs)
            self.rates.close()  # its CTCS server and budget thread (nothing left to limit)

    # -- 1. the plan -----------------------------------------------------------------------------------------

    def plan(self, ref: Reference) -> PullPlan:
        opts, rep = self.opts, self.reporter
        record = image_record(ref, self.api.get_image(ref))
        if opts.load:
            if self.docker is None:
                raise errors.InvalidRequest("no Docker client to load the image into")
            self.docker.ping()  # fail now, not after the download, if the daemon is down
        config = self.api.get_blob(record.config_digest, MAX_CONFIG)
        diff_ids = check_config(record, config)
        present = 0
        if opts.output is None and self.docker is not None:
            present = present_prefix(diff_ids, self.docker.local_chain_ids())
        needed: list[LayerInfo] = []  # one transfer per blob digest; docker load finds each layer by its diff_id
        for layer in record.layers[present:]:
            if all(n.digest != layer.digest for n in needed):
                needed.append(layer)
        bytes_present = sum(layer.size for layer in record.layers[:present])
        if present:
            rep.info(f"{present} of {len(diff_ids)} layers already in Docker ({bytes_present} bytes)")
        empty = [layer for layer in needed if layer.size == 0]
        for layer in empty:  # nothing to fetch: the bytes are known, and the digest must be theirs
            if empty_digest(digest_algorithm(layer.digest)) != layer.digest:
                raise errors.IntegrityError(f"layer {layer.digest} of {ref} is empty but its digest is not that of "
                                            "no bytes", "the registry's record is inconsistent")
        torrents: list[tuple[LayerInfo, TorrentMeta, bytes]] = []
        torrent_bytes = 0
        for layer in needed:  # every torrent checked before anything touches the disk
            if layer.size == 0:
                continue
            torrent = self.api.get_torrent(layer.digest)  # also in http mode: its piece hashes check a resumed file
            torrent_bytes += len(torrent)
            if torrent_bytes > MAX_TORRENT_TOTAL:
                raise errors.IntegrityError(f"the torrents of {ref} add up to more than {MAX_TORRENT_TOTAL} bytes; "
                                            "refused", "the registry is broken or hostile; nothing was downloaded")
            meta = read_torrent(torrent)
            check_layer_torrent(meta, layer, ref)
            check_torrent_size(torrent, meta.pieces, f"layer {layer.digest}")
            torrents.append((layer, meta, torrent))
        location = ensure_dir(opts.location)
        blobs_dir = cache_dir(location, "blobs")
        for layer in needed:
            unlink_link(blobs_dir / layer.hex)
        for layer in empty:
            (blobs_dir / layer.hex).write_bytes(b"")
        self.jobs.extend(BlobJob(layer, meta, torrent, blobs_dir / layer.hex,
                                 cache_dir(location, "torrents", layer.hex)) for layer, meta, torrent in torrents)
        return PullPlan(record, config, diff_ids, present, bytes_present, empty, self.jobs, blobs_dir,
                        opts.load, opts.output)

    # -- 2. and 3. the run -----------------------------------------------------------------------------------

    def run(self, plan: PullPlan, start: float) -> PullResult:
        opts, rep, record = self.opts, self.reporter, plan.record
        result = PullResult(ref=str(record.ref), digest=record.digest, image_id=record.image_id, bytes=record.size,
                            seconds=0.0, loaded=False, output=None,
                            tracker=plan.jobs[0].meta.announce if plan.jobs else None)
        cached: list[BlobJob] = []
        fetched: list[BlobJob] = []
        with contextlib.ExitStack() as locks:
            for job in sorted(plan.jobs, key=lambda j: j.layer.hex):
                locks.enter_context(blob_lock(job.workdir / "lock", self.engine, rep, job.layer.digest))
            for job in plan.jobs:
                (cached if self._cached(job) else fetched).append(job)
            if cached:
                rep.info(f"{len(cached)} layer(s) already downloaded and verified in {opts.location}")
            if fetched:
                if self.handoff is not None:
                    self.handoff.drop([j.layer.digest for j in fetched])  # a damaged copy it may seed
                    if opts.transport != "http":  # nothing to hand over when every layer comes over HTTP
                        self.handoff.attach()
                result.peer_ip = self._download(record, fetched, self._transport(fetched))
                if opts.seed_time <= 0:
                    self.transfers.stop_all(self.jobs)
                self._verify(record, fetched)
                self.transfers.join_reseeds(self.jobs)
        # seed-time counts from the engine's completion, not from the end of our verification
        completed_at = max((getattr(j.proc, "completed_at", None) or time.monotonic() for j in fetched),
                           default=time.monotonic())
        entries = plan.entries()
        if plan.output:
            result.output = str(write_output(tar_stream(entries), plan.output))
            rep.info(f"Wrote {result.output}")
        seeders = [j for j in fetched if j.proc is not None and j.fetch is None]
        policies = {id(j): SeedPolicy(self.tracker, j.meta, completed_at, opts.seed_time, opts.scrape_interval)
                    for j in seeders}
        if plan.load:
            self._load_while_seeding(record, entries, seeders, policies)
            result.loaded = True
        result.seconds = round(time.monotonic() - start, 3)
        result.extra = self._summary(plan, cached, fetched)
        if self.handoff is not None:
            result.extra["seeding"] = self._in_background(record, fetched)
        else:
            result.extra["seeding"] = "foreground" if any(j.seeding for j in seeders) else "none"
            self._seed_rest(record, seeders, policies)
        return result

    def _in_background(self, record: LayeredRecord, fetched: list[BlobJob]) -> str:
        """Wait until the background seeder took every blob handed over (it starts in a moment); say so."""
        handoff = self.handoff
        assert handoff is not None
        handed = [j for j in fetched if j.handed_over]
        if not handoff.settle():
            self.warn(f"the background seeder of {self.opts.location} did not start (see "
                      f"{handoff.files.log}); {record.ref} is not seeded for other hosts")
            return "none"
        if not handed:
            return "none"
        self.reporter.info(f"Seeding {len(handed)} layer(s) of {record.ref} for other peers in the background for "
                           f"up to {self.opts.seed_time:.0f} s (`docket seed --list`; `docket seed --stop` ends it)")
        return "background"

    def _summary(self, plan: PullPlan, cached: list[BlobJob], fetched: list[BlobJob]) -> dict[str, Any]:
        """The --json keys of a pull (README, "docket pull")."""
        from_http = sum(j.bytes_from_http for j in fetched)
        vias = {j.via for j in fetched}
        transport = "none" if not vias else vias.pop() if len(vias) == 1 else "p2p+http"
        return {
            "bytes_from_peers": sum(j.bytes_from_peers for j in fetched),
            "bytes_from_registry": len(plan.config) + from_http,  # everything over HTTP: config + layer fallbacks
            "bytes_from_http": from_http,  # layer bytes over HTTP (transport http, or the auto fallback)
            "bytes_present": plan.bytes_present,
            "bytes_cached": sum(j.layer.size for j in cached),
            "bytes_resumed": sum(j.resumed for j in fetched),
            "layers": len(plan.diff_ids),
            "layers_downloaded": len(fetched),
            "layers_cached": len(cached),
            "layers_present": plan.present,
            "layers_over_http": sum(1 for j in fetched if j.fetch is not None),
            "transport": transport,
            "transport_requested": self.opts.transport,
            "fallback_reason": self.transfers.fallback_reason,
            "layer_transfers": [j.summary() for j in fetched] + [j.summary(cached=True) for j in cached],
        }

    def _transport(self, jobs: list[BlobJob]) -> str:
        """The transport to start with: "auto" becomes "http" when the tracker cannot be reached at all, or is a
        loopback tracker of a registry on another host (said once, before any transfer; p2p tries anyway)."""
        mode = self.opts.transport
        meta = jobs[0].meta
        loopback = loopback_tracker_elsewhere(self.api.url, meta.announce) if mode != "http" else None
        if loopback and mode == "auto":
            self.transfers.fallback_reason = loopback
            self.warn(f"{loopback}. Downloading over HTTP from the registry instead")
            return "http"
        if loopback:
            self.warn(f"{loopback}. Trying BitTorrent anyway (--transport p2p)")
        if mode == "auto":
            why = self.tracker.unreachable(meta.announce, meta.info_hash)
            if why:
                self.transfers.fallback_reason = f"tracker {meta.announce} unreachable ({why})"
                self.warn(f"the tracker {meta.announce} is unreachable ({why}); downloading over HTTP "
                          f"from the registry at {self.api.url} instead")
                return "http"
        return mode

    def _cached(self, job: BlobJob) -> bool:
        try:
            if job.blob.stat().st_size != job.layer.size:
                return False
        except FileNotFoundError:
            return False
        resumed = bitfield_bytes(self.engine.saved_pieces(job.workdir, job.torrent_path), job.meta)
        if resumed is not None and resumed < job.layer.size:
            return False  # an interrupted download (the file may be full-size but sparse): it resumes
        # A mismatch is kept, not deleted: the engine re-checks every piece at start and the HTTP fetch keeps the
        # pieces that verify (an interrupted HTTP transfer leaves a full-size file without saved pieces).
        return digest_file(job.blob, digest_algorithm(job.layer.digest)) == job.layer.digest

    def _download(self, record: LayeredRecord, jobs: list[BlobJob], mode: str) -> str | None:
        """The one loop: a bounded pool of jobs (MAX_TRANSFERS at a time, in the image's order), each polled
        every ``poll_interval``, the whole pull failing after ``stall_timeout`` without progress."""
        opts, tr = self.opts, self.transfers
        ensure_space(jobs[0].blob.parent, [(j.blob, j.layer.size) for j in jobs])
        peer_ip = choose_peer_ip(jobs[0].meta.announce, opts.peer_ip) if mode != "http" else None
        seed_hours = max(1, math.ceil(opts.seed_time / 3600))  # orphans die eventually
        total = sum(j.layer.size for j in jobs)
        if mode == "http":
            self.reporter.info(f"Downloading {len(jobs)} layer(s) of {record.ref} ({total} bytes) over HTTP from "
                               f"the registry at {self.api.url}")
        else:
            via = f" as peer {peer_ip}" if peer_ip else ""
            self.reporter.info(f"Downloading {len(jobs)} layer(s) of {record.ref} ({total} bytes) through "
                               f"BitTorrent{via}")
        waiting = collections.deque(jobs)
        last_total, last_progress = -1, time.monotonic()
        with self.reporter.task(f"Downloading {record.ref}", total or None) as task:
            while True:
                while waiting and sum(1 for j in jobs if j.started and not j.done) < MAX_TRANSFERS:
                    tr.start(waiting.popleft(), mode, peer_ip, seed_hours)
                now = time.monotonic()
                got, rate = 0, 0.0
                for job in jobs:
                    if job.started:
                        over_http = job.fetch is not None
                        n, r = tr.poll(job, now, mode, record.ref, self.jobs)
                        got, rate = got + n, rate + r
                        if job.fetch is not None and not over_http:
                            last_progress = now  # stopping the engine and checking pieces takes a moment
                task.update(got, rate)
                if all(j.done for j in jobs):
                    return peer_ip
                if got > last_total:
                    last_total, last_progress = got, now
                if now - last_progress > opts.stall_timeout:
                    raise self._stalled(record, next(j for j in jobs if j.started and not j.done))
                time.sleep(opts.poll_interval)

    def _stalled(self, record: LayeredRecord, stuck: BlobJob) -> errors.TransferError:
        timeout = self.opts.stall_timeout
        if stuck.fetch is not None:
            return errors.TransferError(
                f"no download progress for {timeout:g} s pulling {record.ref} (layer {stuck.layer.digest} over "
                f"HTTP from {self.api.url})", "is the registry overloaded? a retry resumes the partial files")
        return self.transfers.transfer_error(
            stuck, f"no download progress for {timeout:g} s pulling {record.ref} (layer {stuck.layer.digest})",
            "is the tracker reachable from this host, and is the registry seeding (docket-registry's /healthz)? a "
            "retry resumes the partial files; raise --stall-timeout for slow links"
            + ("; --transport auto (the default) falls back to HTTP" if self.opts.transport == "p2p" else ""))

    def _verify(self, record: LayeredRecord, jobs: list[BlobJob]) -> None:
        total = sum(j.layer.size for j in jobs)
        base = 0
        with self.reporter.task("Verifying digests", total or None) as task:
            for job in jobs:
                try:
                    digest = digest_file(job.blob, digest_algorithm(job.layer.digest),
                                         lambda n, b=base: task.update(b + n))
                except FileNotFoundError as exc:
                    raise errors.TransferError(f"the download reported completion but {job.blob} is missing") \
                        from exc
                base += job.layer.size
                if digest != job.layer.digest:
                    self.transfers.stop_all(self.jobs)
                    with contextlib.suppress(FileNotFoundError):
                        job.blob.unlink()
                    self.engine.forget(job.workdir)
                    raise errors.IntegrityError(
                        f"layer {job.layer.digest} of {record.ref} downloaded with digest {digest}, expected "
                        f"{job.layer.digest}",
                        "the bad file was deleted; pull again (if it repeats, the registry's blob is corrupt)")
        self.reporter.info(f"Verified {len(jobs)} layer(s)")

    def _tend(self, jobs: list[BlobJob], policies: dict[int, SeedPolicy]) -> None:
        """Stop each seeding blob whose policy says nobody needs it any more (in the background)."""
        for job in jobs:
            if job.seeding and policies[id(job)].done():
                self.transfers.stop_async(job)

    def _load_while_seeding(self, record: LayeredRecord, entries: list[LoadEntry], jobs: list[BlobJob],
                            policies: dict[int, SeedPolicy]) -> None:
        docker = self.docker
        assert docker is not None
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["id"] = docker.load_stream(tar_stream(entries), record.ref, record.image_id)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                outcome["error"] = exc

        self.reporter.info(f"Loading {record.ref} into Docker"
                           + (" (still seeding for other peers)" if any(j.seeding for j in jobs) else ""))
        thread = threading.Thread(target=run, name="docker-load", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(self.opts.poll_interval)
            self._tend(jobs, policies)
        if "error" in outcome:
            raise outcome["error"]
        self.reporter.info(f"Loaded {record.ref} ({record.image_id})")

    def _seed_rest(self, record: LayeredRecord, jobs: list[BlobJob], policies: dict[int, SeedPolicy]) -> None:
        if not any(j.seeding for j in jobs):
            return
        left = max(0.0, max(pol.deadline for pol in policies.values()) - time.monotonic())
        self.reporter.info(f"Seeding {record.ref} for other peers for up to {left:.0f} s (Ctrl-C stops)")
        while any(j.seeding for j in jobs):
            self._tend(jobs, policies)
            time.sleep(self.opts.poll_interval)
        self.transfers.stop_all(self.jobs)
