"""One blob of a pull as a job: its torrent and file, and how its bytes arrive (the BitTorrent engine, HTTP, or
the engine first and HTTP for the rest), with the stall, fallback, reseed and stop rules every blob shares.

Transports (``PullOptions.transport``): "p2p" only BitTorrent; "http" only the registry over HTTP (no engine);
"auto" BitTorrent, and per blob HTTP (resumed with Range from the pieces already verified on disk) once the swarm
gave no progress for ``fallback_after`` seconds, or at once for every blob when the tracker is unreachable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from docket import errors
from docket.client.api import RegistryClient
from docket.client.background import Handoff, SeedRequest
from docket.client.cache import atomic_write
from docket.client.http_fetch import HttpFetch, piece_hashes, verified_bytes
from docket.client.progress import Reporter, printable
from docket.client.records import LayerInfo
from docket.torrent.engine import TorrentEngine, Transfer
from docket.torrent.metainfo import TorrentMeta
from docket.torrent.ratelimit import HostRates

log = logging.getLogger(__name__)

STOP_WAIT = 2.0  # seconds between ctorrent's first SIGTERM and the next
FETCH_JOIN = 10.0  # seconds to wait for a cancelled HTTP fetch thread at the end of a pull
MAX_SEEDERS = 32  # finished blobs' transfers kept seeding at once; later ones stop when they finish
_BOILERPLATE = ("META INFO", "Announce:", "Piece length:", "Created with:", "Creation date:", "FILES INFO", "<1> ",
                "Total:", "Creating file", "Press 'h'", "End of input reached", "Input channel is now off")


def bitfield_bytes(raw: bytes | None, meta: TorrentMeta) -> int | None:
    """Bytes a saved bitfield says are on disk (pieces set x piece length, the last piece its real size);
    None when there is no usable bitfield."""
    if raw is None or meta.pieces <= 0 or len(raw) != (meta.pieces + 7) // 8:
        return None
    have = [i for i in range(meta.pieces) if raw[i // 8] & (0x80 >> (i % 8))]
    last = meta.length - (meta.pieces - 1) * meta.piece_length
    return sum(last if i == meta.pieces - 1 else meta.piece_length for i in have)


@dataclass
class BlobJob:
    layer: LayerInfo
    meta: TorrentMeta
    torrent: bytes
    blob: Path
    workdir: Path
    proc: Transfer | None = None
    fetch: HttpFetch | None = None  # set once the blob goes over HTTP
    started: bool = False  # taken from the queue of the transfer pool
    done: bool = False
    resumed: int = 0  # bytes already on disk from an interrupted pull (saved pieces that verify)
    all_pieces_since: float | None = None
    last_have: int = -1  # pieces the engine had at the last progress
    last_progress: float = 0.0
    fallback_reason: str | None = None
    reseed: threading.Thread | None = None  # replacing the finished download with a seeder (here or in the background)
    handed_over: bool = False  # the background seeder seeds it (background.py)
    stopping: threading.Thread | None = None

    @property
    def torrent_path(self) -> Path:
        return self.workdir / f"{self.layer.hex}.torrent"

    @property
    def bytes_from_http(self) -> int:
        return self.fetch.received if self.fetch is not None else 0

    @property
    def bytes_from_peers(self) -> int:
        if self.proc is None:
            return 0
        return max(0, self.layer.size - self.resumed - self.bytes_from_http)

    @property
    def via(self) -> str:
        """How this blob's bytes arrived: "p2p", "http" or "p2p+http"."""
        if self.fetch is None:
            return "p2p"
        return "p2p+http" if self.bytes_from_peers else "http"

    @property
    def seeding(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def summary(self, cached: bool = False) -> dict[str, Any]:
        return {"digest": self.layer.digest, "diff_id": self.layer.diff_id, "size": self.layer.size,
                "via": "cached" if cached else self.via, "bytes_from_peers": 0 if cached else self.bytes_from_peers,
                "bytes_from_http": 0 if cached else self.bytes_from_http,
                "bytes_resumed": 0 if cached else self.resumed}


class Transfers:
    """Starts, tends and stops the jobs of one pull; ``warn`` prints a warning line."""

    def __init__(self, api: RegistryClient, engine: TorrentEngine, reporter: Reporter,
                 warn: Callable[[str], None], *, seed_time: float, complete_grace: float, fallback_after: float,
                 rates: HostRates | None, peer_port: int | None, handoff: Handoff | None = None) -> None:
        self.api = api
        self.engine = engine
        self.reporter = reporter
        self.warn = warn
        self.seed_time = seed_time
        self.complete_grace = complete_grace
        self.fallback_after = fallback_after
        self.rates = rates  # the pull's bandwidth budget (its engine has it too): HTTP fetches take part
        self.peer_port = peer_port
        self.handoff = handoff  # None: finished blobs seed in this process (--wait)
        self.ref = ""  # the image's reference, for the background seeder's listing (set once the plan is known)
        self.fallback_reason: str | None = None  # the first reason HTTP took over

    def start(self, job: BlobJob, mode: str, peer_ip: str | None, seed_hours: int) -> None:
        job.started = True
        job.last_progress = time.monotonic()
        if mode == "http":
            self.http(job)
            return
        atomic_write(job.torrent_path, job.torrent)
        saved = self.engine.saved_pieces(job.workdir, job.torrent_path)
        if saved:  # count only the pieces that really verify: a poisoned one is fetched again
            job.resumed = verified_bytes(job.blob, job.layer.size, job.meta.piece_length, piece_hashes(job.torrent),
                                         saved)
        if job.resumed:
            self.reporter.info(f"Resuming layer {job.layer.digest}: {job.resumed} bytes already downloaded")
        job.proc = self.engine.download(job.torrent_path, job.blob, workdir=job.workdir, listen_ip=peer_ip,
                                        port=self.peer_port, seed_hours=seed_hours,
                                        log_path=job.workdir / "ctorrent.log")

    def http(self, job: BlobJob, before: Callable[[], Any] | None = None) -> HttpFetch:
        job.fetch = HttpFetch(self.api, job.layer.digest, job.layer.size, job.blob, job.meta.piece_length,
                              piece_hashes(job.torrent), before=before, rates=self.rates).start()
        return job.fetch

    def poll(self, job: BlobJob, now: float, mode: str, ref: object, jobs: list[BlobJob]) -> tuple[int, float]:
        """One look at a started job: (bytes it has, bytes/s); marks it done, falls back or raises."""
        if job.done:
            return job.layer.size, 0.0
        if job.fetch is not None:
            return self._poll_http(job), 0.0
        proc = job.proc
        assert proc is not None
        if proc.completed.is_set():
            job.done = True
            self.reseed_async(job, jobs)
            return job.layer.size, 0.0
        got, rate = 0, 0.0
        st = proc.status
        if st is not None and st.total:
            got, rate = min(job.layer.size, st.have * job.meta.piece_length), st.down_kbps * 1024
            if st.have > job.last_have:
                job.last_have, job.last_progress = st.have, now
            elif st.down_kbps > 0:  # a big piece on a slow link: bytes arrive, no piece yet
                job.last_progress = now
            if st.have >= st.total:
                job.all_pieces_since = job.all_pieces_since or now
                if now - job.all_pieces_since >= self.complete_grace:
                    job.done = True
                    if self.handoff is not None:
                        self.reseed_async(job, jobs)
                    return job.layer.size, rate
        dead = not proc.alive() and not proc.completed.is_set()
        if mode == "auto" and (dead or now - job.last_progress >= self.fallback_after):
            self.fall_back(job, ref, "ctorrent exited" if dead else
                           f"no progress from the swarm for {now - job.last_progress:.0f} s")
        elif dead:
            raise self.transfer_error(job, f"ctorrent exited before layer {job.layer.digest} of {ref} was "
                                      "downloaded", "the partial files are kept and a retry resumes them")
        return got, rate

    def _poll_http(self, job: BlobJob) -> int:
        """Bytes of this blob known so far; marks it done (or raises its error) once its fetch ended."""
        fetch = job.fetch
        assert fetch is not None
        if not fetch.done.is_set():
            return fetch.progress
        if fetch.error is not None:
            raise fetch.error
        if job.proc is None and fetch.plan is not None:
            job.resumed = fetch.plan.valid  # pure HTTP: what earlier pulls left on disk
            if fetch.plan.valid:
                self.reporter.info(f"Resumed layer {job.layer.digest}: {fetch.plan.valid} bytes were already on "
                                   f"disk, {fetch.received} fetched with Range requests")
        self.engine.forget(job.workdir)  # the engine's saved progress no longer describes the file
        job.done = True
        return job.layer.size

    def fall_back(self, job: BlobJob, ref: object, why: str) -> None:
        """Stop this blob's transfer (in the fetch thread: it can take seconds) and continue over HTTP."""
        job.fallback_reason = why + self.diagnosis(job.proc)
        self.fallback_reason = self.fallback_reason or job.fallback_reason
        self.warn(f"layer {job.layer.digest} of {ref}: {job.fallback_reason}; continuing over HTTP from the "
                  f"registry at {self.api.url}")
        proc = job.proc

        def stop() -> None:
            with contextlib.suppress(Exception):
                proc.stop(timeout=STOP_WAIT)  # type: ignore[union-attr]

        self.http(job, before=stop)

    def reseed_async(self, job: BlobJob, jobs: list[BlobJob]) -> None:
        """Swap a finished download for a fresh seeder (CtorrentProcess.reseed says why), in a thread: in the
        background seeder when there is one (``handoff``), else in this process."""
        if self.seed_time <= 0 or job.reseed is not None:
            return
        seeding = sum(1 for j in jobs if j is not job and j.done and j.fetch is None and j.seeding)
        if self.handoff is None and seeding >= MAX_SEEDERS:  # enough processes seed for this pull: this one stops
            self.stop_async(job)
            return

        def run() -> None:
            if self.handoff is not None:
                self.hand_over(job)
            else:
                job.proc = reseeded(job.proc, job.layer.digest)

        job.reseed = threading.Thread(target=run, name=f"reseed-{job.layer.hex[:12]}", daemon=True)
        job.reseed.start()

    def hand_over(self, job: BlobJob) -> None:
        """Halt the finished download and give its blob, address and port to the background seeder."""
        proc, handoff = job.proc, self.handoff
        assert proc is not None and handoff is not None
        completed_at = getattr(proc, "completed_at", None) or time.monotonic()
        try:
            if hasattr(proc, "halt"):
                port = proc.halt()
            else:  # a test double
                port = getattr(proc, "listen_port", None)
                proc.stop(timeout=STOP_WAIT)
        except Exception as exc:  # noqa: BLE001 - the blob is downloaded; only seeding is lost
            log.warning("could not halt ctorrent for %s: %s", job.layer.digest, exc)
            return
        deadline = time.time() + max(0.0, completed_at + self.seed_time - time.monotonic())
        try:
            handoff.seed(SeedRequest(digest=job.layer.digest, torrent=str(job.torrent_path), blob=str(job.blob),
                                     workdir=str(job.workdir), deadline=deadline,
                                     listen_ip=getattr(proc, "listen_ip", None), port=port, size=job.layer.size,
                                     ref=self.ref))
            job.handed_over = True
        except (OSError, errors.DocketError) as exc:
            log.warning("could not hand %s to the background seeder: %s", job.layer.digest, exc)

    def stop_async(self, job: BlobJob) -> None:
        if job.stopping is None:
            job.stopping = threading.Thread(target=self._stop_one, args=(job,), daemon=True)
            job.stopping.start()

    @staticmethod
    def _stop_one(job: BlobJob) -> None:
        with contextlib.suppress(Exception):
            job.proc.stop(timeout=STOP_WAIT)  # type: ignore[union-attr]

    @staticmethod
    def join_reseeds(jobs: list[BlobJob]) -> None:
        for job in jobs:
            if job.reseed is not None:
                job.reseed.join()

    def stop_all(self, jobs: list[BlobJob]) -> None:
        """Stop every transfer we started, all at once from this thread (no thread per process: cleanup must
        work when no new thread can be started), and every HTTP fetch."""
        self.join_reseeds(jobs)  # else a seeder could start after we stopped everything
        fetches = []
        for job in jobs:
            if job.fetch is not None and job.fetch.thread is not None:
                job.fetch.cancel.set()  # seen between chunks; a blocked read ends at its deadline
                fetches.append(job.fetch.thread)
        self.engine.stop_all([job.proc for job in jobs if job.proc is not None], STOP_WAIT)
        deadline = time.monotonic() + FETCH_JOIN
        for t in fetches:
            t.join(max(0.0, deadline - time.monotonic()))

    @staticmethod
    def diagnosis(proc: Transfer | None) -> str:
        """What the engine's last status says about why nothing arrives."""
        st = getattr(proc, "status", None)
        refused = getattr(proc, "tracker_failure", None)
        if refused:
            return f"; the tracker refused the announce: {printable(refused, 300)}"
        if st is None:
            return ""
        failures, replies = getattr(st, "tracker_failures", 0), getattr(st, "tracker_replies", 0)
        if failures and not replies:
            return f"; the tracker did not answer ({failures} failed announces)"
        if getattr(st, "seeds", 0) == 0 and getattr(st, "available", 0) < getattr(st, "total", 0):
            return f"; no connected peer has the missing pieces (swarm of {getattr(st, 'swarm', 0)})"
        return ""

    def transfer_error(self, job: BlobJob, message: str, hint: str) -> errors.TransferError:
        tail: list[str] = []
        with contextlib.suppress(Exception):
            if job.proc is not None:
                tail = [ln for ln in job.proc.tail(40) if ln.strip() and not ln.startswith(_BOILERPLATE)][-8:]
        said = ("\n  ctorrent said:\n    " + "\n    ".join(printable(ln, 300) for ln in tail)) if tail else ""
        return errors.TransferError(f"{message} (tracker {job.meta.announce}){self.diagnosis(job.proc)}{said}", hint)


def reseeded(proc: Any, digest: str) -> Any:
    """``proc`` (a finished download) swapped for a fresh seeder (CtorrentProcess.reseed says why); ``proc``
    itself when it cannot be: not finished, gone, or a test double. A failure only loses the seeding."""
    if proc is None or not proc.completed.is_set() or not proc.alive() or not hasattr(proc, "reseed"):
        return proc
    try:
        return proc.reseed()
    except Exception as exc:  # noqa: BLE001 - the blob is downloaded; only seeding is lost
        log.warning("could not restart ctorrent as a seeder for %s: %s", digest, exc)
        return proc
