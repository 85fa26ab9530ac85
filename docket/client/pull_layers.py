"""Layer pull (docs/layers.md, "Client pull"): config over HTTP, only the missing layers through BitTorrent
(one ctorrent per layer, MAX_TRANSFERS at a time), then a generated legacy ``docker load`` stream holding just those.

Transports (``PullOptions.transport``): "p2p" only BitTorrent; "http" only the registry over HTTP (no ctorrent);
"auto" BitTorrent, and per layer HTTP (resumed with Range from the pieces already verified on disk) once the swarm
gave no progress for ``fallback_after`` seconds, or at once for every layer when the tracker is unreachable.
A layer is identified by its diff_id (chain ids, "already in Docker", the config check) and fetched and verified by
its digest (the blob's bytes, maybe gzip-compressed, become its layer.tar: docker load decompresses it).

Used by ``Puller.pull`` for records with ``format == "layers"``; it reuses the Puller's options, reporter,
ctorrent factory, scraper and helpers so both formats behave alike (locks, cache, seeding policy).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from docket import errors, jsonstrict
from docket.client.http_fetch import (BLOB_DIGEST_RE, MAX_BLOB_SIZE, HttpFetch, check_torrent_size,
                                      digest_algorithm, digest_file, piece_hashes, verified_bytes)
from docket.client.layers import load_entries, present_prefix, tar_stream
from docket.client.peer import choose_peer_ip
from docket.limits import MAX_LAYERS  # the registry's own limit, one number for both sides
from docket.reference import Reference
from docket.torrent.metainfo import TorrentMeta, read_torrent

if TYPE_CHECKING:
    from docket.client.pull import Puller, PullResult

log = logging.getLogger(__name__)
MAX_CONFIG = 64 * 1024 * 1024
MAX_TRANSFERS = 3  # layers downloading at once (ctorrent or HTTP), as docker's max-concurrent-downloads
MAX_SEEDERS = 32  # finished layers' ctorrents kept seeding at once; later ones stop when they finish
MAX_TORRENT_TOTAL = 256 * 1024 * 1024  # the torrents of one pull, held in memory (1,000 layers: ~40 MB at most)
FETCH_JOIN = 10.0  # seconds to wait for a cancelled HTTP fetch thread at the end of a pull
_HEX40_LEN = 40


@dataclass(frozen=True)
class LayerInfo:
    digest: str  # what is transferred and verified: the blob's bytes (compressed or not)
    size: int
    info_hash: str
    diff_id: str = ""  # sha256 of the uncompressed layer tar; "" means equal to digest
    media_type: str | None = None

    def __post_init__(self) -> None:
        if not self.diff_id:
            object.__setattr__(self, "diff_id", self.digest)

    @property
    def hex(self) -> str:
        """The digest's hex, whatever the algorithm (64 chars for sha256, 128 for sha512): file names."""
        return self.digest.split(":", 1)[1]


@dataclass(frozen=True)
class LayeredRecord:
    ref: Reference
    image_id: str
    digest: str
    size: int
    config_digest: str
    config_size: int
    layers: tuple[LayerInfo, ...]

    @classmethod
    def from_json(cls, ref: Reference, data: dict[str, Any]) -> LayeredRecord:
        def bad(field: str, value: Any) -> errors.IntegrityError:
            return errors.IntegrityError(f"the registry's record for {ref} has an invalid {field}: {value!r}",
                                         "the registry is incompatible or broken")

        def digest_of(obj: Any, field: str) -> str:
            if not isinstance(obj, str) or not BLOB_DIGEST_RE.match(obj):
                raise bad(field, obj)
            return obj

        def size_of(obj: Any, field: str, allow_zero: bool = False) -> int:
            if not isinstance(obj, int) or isinstance(obj, bool) or obj < 0 or (obj == 0 and not allow_zero) \
                    or obj > MAX_BLOB_SIZE:
                raise bad(field, obj)
            return obj

        config = data.get("config")
        if not isinstance(config, dict):
            raise bad("config", config)
        layers_raw = data.get("layers")
        if not isinstance(layers_raw, list):  # an empty list is a valid image (a manifest with no layers)
            raise bad("layers", layers_raw)
        if len(layers_raw) > MAX_LAYERS:  # before any work per layer: threads, files, requests
            raise errors.IntegrityError(f"the registry's record for {ref} lists {len(layers_raw)} layers; the limit "
                                        f"is {MAX_LAYERS}", "the registry is broken or hostile; nothing was fetched")
        layers = []
        for i, item in enumerate(layers_raw):
            if not isinstance(item, dict):
                raise bad(f"layers[{i}]", item)
            ih = item.get("info_hash")
            if ih is None and item.get("size") == 0:
                ih = ""  # an empty layer has no torrent (there is nothing to transfer)
            elif not isinstance(ih, str) or len(ih) != _HEX40_LEN or \
                    any(c not in "0123456789abcdef" for c in ih.lower()):
                raise bad(f"layers[{i}].info_hash", ih)
            diff_id = item.get("diff_id")
            media_type = item.get("media_type")
            if media_type is not None and not isinstance(media_type, str):
                raise bad(f"layers[{i}].media_type", media_type)
            layers.append(LayerInfo(digest_of(item.get("digest"), f"layers[{i}].digest"),
                                    size_of(item.get("size"), f"layers[{i}].size", allow_zero=True), ih.lower(),
                                    diff_id=digest_of(diff_id, f"layers[{i}].diff_id") if diff_id is not None else "",
                                    media_type=media_type))
        image_id = digest_of(data.get("image_id"), "image_id")
        config_digest = digest_of(config.get("digest"), "config.digest")
        if config_digest != image_id:
            raise bad("config.digest (differs from image_id)", config_digest)
        config_size = size_of(config.get("size"), "config.size")
        if config_size > MAX_CONFIG:
            raise bad(f"config.size (the limit is {MAX_CONFIG})", config_size)
        size = size_of(data.get("size"), "size")
        if size > config_size + sum(layer.size for layer in layers):  # an image is no larger than its parts
            raise bad("size (larger than the config's and the layers' sizes added up)", size)
        return cls(ref=ref, image_id=image_id, digest=digest_of(data.get("digest"), "digest"), size=size,
                   config_digest=config_digest, config_size=config_size, layers=tuple(layers))


def check_config(record: LayeredRecord, config: bytes) -> list[str]:
    """The config came over plain HTTP: its digest must be the image id, its diff_ids the layers' diff_ids."""
    if len(config) != record.config_size:
        raise errors.IntegrityError(f"the config of {record.ref} is {len(config)} bytes, the registry's record "
                                    f"says {record.config_size}", "the registry is inconsistent or hostile")
    algo = digest_algorithm(record.config_digest)
    got = f"{algo}:{hashlib.new(algo, config).hexdigest()}"
    if got != record.config_digest:
        raise errors.IntegrityError(f"the config of {record.ref} hashes to {got}, expected {record.config_digest}",
                                    "the config was altered in transit or the registry is corrupt")
    try:
        diff_ids = jsonstrict.loads(config, what=f"the config of {record.ref}")["rootfs"]["diff_ids"]
    except (errors.InvalidJSON, KeyError, TypeError) as exc:
        raise errors.IntegrityError(f"the config of {record.ref} has no rootfs.diff_ids") from exc
    if diff_ids != [layer.diff_id for layer in record.layers]:
        raise errors.IntegrityError(f"the config of {record.ref} lists other layers than the registry's record",
                                    "the registry is inconsistent; re-push the image")
    return diff_ids


def check_layer_torrent(meta: TorrentMeta, layer: LayerInfo, ref: Reference) -> None:
    if meta.info_hash != layer.info_hash:
        raise errors.IntegrityError(
            f"the torrent of layer {layer.digest} of {ref} has info hash {meta.info_hash}, but the registry's "
            f"record says {layer.info_hash}", "the torrent was altered in transit or the registry is inconsistent")
    if meta.length != layer.size:
        raise errors.IntegrityError(f"the torrent of layer {layer.digest} describes {meta.length} bytes, but the "
                                    f"layer is {layer.size} bytes", "the registry is inconsistent; re-push")


@dataclass
class _Job:
    layer: LayerInfo
    meta: TorrentMeta
    torrent: bytes
    blob: Path
    workdir: Path
    proc: Any = None
    all_pieces_since: float | None = None
    done: bool = False
    resumed: int = 0  # bytes already on disk from an interrupted pull (ctorrent's bitfield, or verified pieces)
    fetch: HttpFetch | None = None  # set once the layer goes over HTTP
    last_have: int = -1  # pieces ctorrent had at the last progress
    last_progress: float = 0.0
    fallback_reason: str | None = None
    reseed: threading.Thread | None = None  # replacing the finished download's ctorrent with a seeder
    started: bool = False  # taken from the queue of the transfer pool

    @property
    def bitfield(self) -> Path:
        return self.workdir / f"{self.layer.hex}.bf"  # CtorrentProcess: <workdir>/<torrent stem>.bf

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
        """How this layer's bytes arrived: "p2p", "http" or "p2p+http"."""
        if self.fetch is None:
            return "p2p"
        return "p2p+http" if self.bytes_from_peers else "http"


def bitfield_bytes(path: Path, meta: TorrentMeta) -> int | None:
    """Bytes ctorrent's saved bitfield says are on disk (pieces set x piece length, the last piece its real size);
    None when there is no usable bitfield file."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    if meta.pieces <= 0 or len(raw) != (meta.pieces + 7) // 8:
        return None
    have = [i for i in range(meta.pieces) if raw[i // 8] & (0x80 >> (i % 8))]
    last = meta.length - (meta.pieces - 1) * meta.piece_length
    return sum(last if i == meta.pieces - 1 else meta.piece_length for i in have)


def _read_bitfield(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


def write_output(entries: list, output: Path) -> Path:
    """The complete load tarball at ``output`` (temp file in the same directory + atomic rename)."""
    from docket.client.pull import check_output_path

    output = check_output_path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in tar_stream(entries):
                f.write(chunk)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise errors.DocketError(f"cannot write {output}: {exc.strerror or exc}") from exc
    return output


class LayerPull:
    def __init__(self, puller: Puller) -> None:
        self.p = puller
        self.jobs: list[_Job] = []
        self.fallback_reason: str | None = None

    # -- the whole pull ----------------------------------------------------------------------------------------

    def run(self, ref: Reference, data: dict[str, Any], start: float) -> PullResult:
        from docket.client.pull import PullResult, cache_dir, ensure_dir, unlink_link

        p, opts, rep = self.p, self.p.opts, self.p.reporter
        record = LayeredRecord.from_json(ref, data)
        if opts.load:
            if p.docker is None:
                raise errors.InvalidRequest("no Docker client to load the image into")
            p.docker.ping()
        config = p.api.get_blob(record.config_digest, MAX_CONFIG)
        diff_ids = check_config(record, config)
        present = 0
        if opts.output is None and p.docker is not None:
            present = present_prefix(diff_ids, p.docker.local_chain_ids())
        # one transfer per blob digest; docker load finds each layer by its diff_id
        needed: list[LayerInfo] = []
        for layer in record.layers[present:]:
            if all(n.digest != layer.digest for n in needed):
                needed.append(layer)
        bytes_present = sum(layer.size for layer in record.layers[:present])
        if present:
            rep.info(f"{present} of {len(diff_ids)} layers already in Docker ({bytes_present} bytes)")
        location = ensure_dir(opts.location)
        blobs_dir = cache_dir(location, "blobs")
        for layer in needed:
            unlink_link(blobs_dir / layer.hex)
        empty = [layer for layer in needed if layer.size == 0]
        for layer in empty:  # nothing to fetch: the bytes are known, and the digest must be theirs
            if f"{digest_algorithm(layer.digest)}:{hashlib.new(digest_algorithm(layer.digest)).hexdigest()}" \
                    != layer.digest:
                raise errors.IntegrityError(f"layer {layer.digest} of {ref} is empty but its digest is not that of "
                                            "no bytes", "the registry's record is inconsistent")
            (blobs_dir / layer.hex).write_bytes(b"")
        torrent_bytes = 0
        for layer in needed:
            if layer.size == 0:
                continue
            torrent = p.api.get_torrent(layer.digest)  # also in http mode: its piece hashes check a resumed file
            torrent_bytes += len(torrent)
            if torrent_bytes > MAX_TORRENT_TOTAL:
                raise errors.IntegrityError(f"the torrents of {ref} add up to more than {MAX_TORRENT_TOTAL} bytes; "
                                            "refused", "the registry is broken or hostile; nothing was downloaded")
            meta = read_torrent(torrent)
            check_layer_torrent(meta, layer, ref)
            check_torrent_size(torrent, meta.pieces, f"layer {layer.digest}")
            self.jobs.append(_Job(layer, meta, torrent, blobs_dir / layer.hex,
                                  cache_dir(location, "torrents", layer.hex)))
        result = PullResult(ref=str(ref), digest=record.digest, image_id=record.image_id, bytes=record.size,
                            seconds=0.0, loaded=False, output=None, format="layers",
                            tracker=self.jobs[0].meta.announce if self.jobs else None)
        cached: list[_Job] = []
        fetched: list[_Job] = []
        try:
            with contextlib.ExitStack() as locks:
                from docket.client.pull import blob_lock

                for job in sorted(self.jobs, key=lambda j: j.layer.hex):
                    locks.enter_context(blob_lock(job.workdir / "lock", rep, job.layer.digest))
                for job in self.jobs:
                    (cached if self._cached(job) else fetched).append(job)
                if cached:
                    rep.info(f"{len(cached)} layer(s) already downloaded and verified in {location}")
                if fetched:
                    result.peer_ip = self._download(record, fetched, self._transport(fetched))
                    if opts.seed_time <= 0:
                        self._stop_all()
                    self._verify(record, fetched)
                    self._join_reseeds()
            completed_at = max((getattr(j.proc, "completed_at", None) or time.monotonic() for j in fetched),
                               default=time.monotonic())
            blobs = {layer.diff_id: blobs_dir / layer.hex for layer in empty}
            blobs.update({j.layer.diff_id: j.blob for j in self.jobs})
            entries = load_entries(str(ref), record.config_digest, config, diff_ids, blobs)
            if opts.output:
                result.output = str(write_output(entries, opts.output))
                rep.info(f"Wrote {result.output}")
            from docket.client.pull import _SeedPolicy

            seeders = [j for j in fetched if j.proc is not None and j.fetch is None]
            policies = {id(j): _SeedPolicy(p, j.meta, completed_at, proc=j.proc) for j in seeders}
            if opts.load:
                self._load_while_seeding(record, entries, seeders, policies)
                result.loaded = True
            result.seconds = round(time.monotonic() - start, 3)
            result.extra = self._summary(config, diff_ids, present, bytes_present, cached, fetched)
            self._seed_rest(record, seeders, policies)
        finally:
            self._stop_all()
        return result

    def _summary(self, config: bytes, diff_ids: list[str], present: int, bytes_present: int, cached: list[_Job],
                 fetched: list[_Job]) -> dict[str, Any]:
        """The --json keys of a layer pull (README, "docket pull")."""
        from_http = sum(j.bytes_from_http for j in fetched)
        vias = {j.via for j in fetched}
        transport = "none" if not vias else vias.pop() if len(vias) == 1 else "p2p+http"
        return {
            "bytes_from_peers": sum(j.bytes_from_peers for j in fetched),
            "bytes_from_registry": len(config) + from_http,  # everything over HTTP: config + layer fallbacks
            "bytes_from_http": from_http,  # layer bytes over HTTP (transport http, or the auto fallback)
            "bytes_present": bytes_present,
            "bytes_cached": sum(j.layer.size for j in cached),
            "bytes_resumed": sum(j.resumed for j in fetched),
            "layers": len(diff_ids),
            "layers_downloaded": len(fetched),
            "layers_cached": len(cached),
            "layers_present": present,
            "layers_over_http": sum(1 for j in fetched if j.fetch is not None),
            "transport": transport,
            "transport_requested": self.p.opts.transport,
            "fallback_reason": self.fallback_reason,
            "layer_transfers": [
                {"digest": j.layer.digest, "diff_id": j.layer.diff_id, "size": j.layer.size, "via": j.via,
                 "bytes_from_peers": j.bytes_from_peers, "bytes_from_http": j.bytes_from_http,
                 "bytes_resumed": j.resumed} for j in fetched
            ] + [{"digest": j.layer.digest, "diff_id": j.layer.diff_id, "size": j.layer.size, "via": "cached",
                  "bytes_from_peers": 0, "bytes_from_http": 0, "bytes_resumed": 0} for j in cached],
        }

    def _transport(self, jobs: list[_Job]) -> str:
        """The transport to start with: "auto" becomes "http" when the tracker cannot be reached at all."""
        mode = self.p.opts.transport
        if mode == "auto":
            meta = jobs[0].meta
            why = self.p.tracker_unreachable(meta.announce, meta.info_hash)
            if why:
                self.fallback_reason = f"tracker {meta.announce} unreachable ({why})"
                self.p.warn(f"the tracker {meta.announce} is unreachable ({why}); downloading over HTTP "
                            f"from the registry at {self.p.api.url} instead")
                return "http"
        return mode

    # -- steps -------------------------------------------------------------------------------------------------

    def _cached(self, job: _Job) -> bool:
        try:
            if job.blob.stat().st_size != job.layer.size:
                return False
        except FileNotFoundError:
            return False
        resumed = bitfield_bytes(job.bitfield, job.meta)
        if resumed is not None and resumed < job.layer.size:
            return False  # an interrupted download (the file may be full-size but sparse): ctorrent resumes it
        # A mismatch is kept, not deleted: ctorrent re-checks every piece at start and the HTTP fetch keeps the
        # pieces that verify (an interrupted HTTP transfer leaves a full-size file without a bitfield).
        return digest_file(job.blob, digest_algorithm(job.layer.digest)) == job.layer.digest

    def _http(self, job: _Job, before: Any = None) -> HttpFetch:
        job.fetch = HttpFetch(self.p.api, job.layer.digest, job.layer.size, job.blob, job.meta.piece_length,
                              piece_hashes(job.torrent), before=before).start()
        return job.fetch

    def _fall_back(self, job: _Job, record: LayeredRecord, why: str) -> None:
        """Stop this layer's ctorrent (in the fetch thread: it can take seconds) and continue over HTTP."""
        p = self.p
        p.proc = job.proc
        job.fallback_reason = why + p._diagnosis()
        self.fallback_reason = self.fallback_reason or job.fallback_reason
        p.warn(f"layer {job.layer.digest} of {record.ref}: {job.fallback_reason}; continuing over HTTP from the "
               f"registry at {p.api.url}")
        proc = job.proc

        def stop() -> None:
            from docket.client.pull import STOP_WAIT

            with contextlib.suppress(Exception):
                proc.stop(timeout=STOP_WAIT)

        self._http(job, before=stop)

    def _download(self, record: LayeredRecord, jobs: list[_Job], mode: str) -> str | None:
        from docket.client.pull import _atomic_write, ensure_space

        p, opts = self.p, self.p.opts
        ensure_space(jobs[0].blob.parent, [(j.blob, j.layer.size) for j in jobs])
        peer_ip = choose_peer_ip(jobs[0].meta.announce, opts.peer_ip) if mode != "http" else None
        exit_hours = max(1, math.ceil(opts.seed_time / 3600))
        total = sum(j.layer.size for j in jobs)
        if mode == "http":
            p.reporter.info(f"Downloading {len(jobs)} layer(s) of {record.ref} ({total} bytes) over HTTP from the "
                            f"registry at {p.api.url}")
        else:
            via = f" as peer {peer_ip}" if peer_ip else ""
            p.reporter.info(f"Downloading {len(jobs)} layer(s) of {record.ref} ({total} bytes) through "
                            f"BitTorrent{via}")

        def start(job: _Job) -> None:
            job.started = True
            job.last_progress = time.monotonic()
            if job.layer.size == 0:  # nothing to transfer; ctorrent cannot make a 0-byte torrent anyway
                job.blob.write_bytes(b"")
                job.done = True
                return
            if mode == "http":
                self._http(job)
                return
            torrent_path = job.workdir / f"{job.layer.hex}.torrent"
            _atomic_write(torrent_path, job.torrent)
            bitfield = _read_bitfield(job.bitfield)
            if bitfield:  # count only the pieces that really verify: a poisoned one is fetched again
                job.resumed = verified_bytes(job.blob, job.layer.size, job.meta.piece_length,
                                             piece_hashes(job.torrent), bitfield)
            if job.resumed:
                p.reporter.info(f"Resuming layer {job.layer.digest}: {job.resumed} bytes already downloaded")
            job.proc = p._new_ctorrent(torrent=torrent_path, save_as=job.blob, workdir=job.workdir,
                                       listen_ip=peer_ip, port=opts.peer_port, exit_hours=exit_hours,
                                       log_path=job.workdir / "ctorrent.log")
            job.proc.start()

        # a bounded pool: MAX_TRANSFERS layers at a time, in the image's order (threads, processes, files bounded)
        waiting = collections.deque(jobs)
        last_total, last_progress = -1, time.monotonic()
        with p.reporter.task(f"Downloading {record.ref}", total or None) as task:
            while True:
                while waiting and sum(1 for j in jobs if j.started and not j.done) < MAX_TRANSFERS:
                    start(waiting.popleft())
                now = time.monotonic()
                got, rate = 0, 0.0
                for job in jobs:
                    if not job.started:
                        continue
                    if job.done:
                        got += job.layer.size
                        continue
                    if job.fetch is not None:
                        got += self._tend_http(job)
                        continue
                    proc = job.proc
                    if proc.completed.is_set():
                        job.done = True
                        got += job.layer.size
                        self._reseed_async(job)
                        continue
                    st = proc.status
                    if st is not None and st.total:
                        got += min(job.layer.size, st.have * job.meta.piece_length)
                        rate += st.down_kbps * 1024
                        if st.have > job.last_have:
                            job.last_have, job.last_progress = st.have, now
                        elif st.down_kbps > 0:  # a big piece on a slow link: bytes arrive, no piece yet
                            job.last_progress = now
                        if st.have >= st.total:
                            job.all_pieces_since = job.all_pieces_since or now
                            if now - job.all_pieces_since >= opts.complete_grace:
                                job.done = True
                    if job.done:
                        continue
                    dead = not proc.alive() and not proc.completed.is_set()
                    if mode == "auto" and (dead or now - job.last_progress >= opts.fallback_after):
                        self._fall_back(job, record, "ctorrent exited" if dead else
                                        f"no progress from the swarm for {now - job.last_progress:.0f} s")
                        last_progress = now  # stopping ctorrent and checking pieces takes a moment
                        continue
                    if dead:
                        p.proc = proc
                        raise p._transfer_error(
                            f"ctorrent exited before layer {job.layer.digest} of {record.ref} was downloaded",
                            job.meta, "the partial files are kept and a retry resumes them")
                task.update(got, rate)
                if all(j.done for j in jobs):
                    break
                if got > last_total:
                    last_total, last_progress = got, now
                if now - last_progress > opts.stall_timeout:
                    stuck = next(j for j in jobs if j.started and not j.done)
                    p.proc = stuck.proc
                    if stuck.fetch is not None:
                        raise errors.TransferError(
                            f"no download progress for {opts.stall_timeout:g} s pulling {record.ref} (layer "
                            f"{stuck.layer.digest} over HTTP from {p.api.url})",
                            "is the registry overloaded? a retry resumes the partial files")
                    raise p._transfer_error(
                        f"no download progress for {opts.stall_timeout:g} s pulling {record.ref} "
                        f"(layer {stuck.layer.digest})", stuck.meta,
                        "is the tracker reachable from this host, and is the registry seeding (docket-registry's "
                        "/healthz)? a retry resumes the partial files; raise --stall-timeout for slow links"
                        + ("; --transport auto (the default) falls back to HTTP" if opts.transport == "p2p" else ""))
                time.sleep(opts.poll_interval)
        return peer_ip

    def _tend_http(self, job: _Job) -> int:
        """Bytes of this layer known so far; marks it done (or raises its error) once its fetch ended."""
        fetch = job.fetch
        assert fetch is not None
        if not fetch.done.is_set():
            return fetch.progress
        if fetch.error is not None:
            raise fetch.error
        if job.proc is None and fetch.plan is not None:
            job.resumed = fetch.plan.valid  # pure HTTP: what earlier pulls left on disk
        if fetch.plan is not None and fetch.plan.valid and job.proc is None:
            self.p.reporter.info(f"Resumed layer {job.layer.digest}: {fetch.plan.valid} bytes were already on "
                                 f"disk, {fetch.received} fetched with Range requests")
        for bf in job.workdir.glob("*.bf"):  # ctorrent's bitfield no longer describes the file
            with contextlib.suppress(FileNotFoundError):
                bf.unlink()
        job.done = True
        return job.layer.size

    def _verify(self, record: LayeredRecord, jobs: list[_Job]) -> None:
        total = sum(j.layer.size for j in jobs)
        base = 0
        with self.p.reporter.task("Verifying digests", total or None) as task:
            for job in jobs:
                try:
                    digest = digest_file(job.blob, digest_algorithm(job.layer.digest),
                                         lambda n, b=base: task.update(b + n))
                except FileNotFoundError as exc:
                    raise errors.TransferError(f"the download reported completion but {job.blob} is missing") \
                        from exc
                base += job.layer.size
                if digest != job.layer.digest:
                    self._stop_all()
                    self.p._discard(job.blob, job.workdir)
                    raise errors.IntegrityError(
                        f"layer {job.layer.digest} of {record.ref} downloaded with digest {digest}",
                        "the bad file was deleted; pull again (if it repeats, the registry's blob is corrupt)")
        self.p.reporter.info(f"Verified {len(jobs)} layer(s)")

    def _seeding(self, jobs: list[_Job]) -> list[_Job]:
        return [j for j in jobs if j.proc is not None and j.proc.alive()]

    def _tend(self, jobs: list[_Job], policies: dict[int, Any]) -> None:
        """Stop each torrent whose policy says nobody needs it any more (in the background)."""
        for job in self._seeding(jobs):
            if policies[id(job)].done():
                self._stop_async(job)

    def _load_while_seeding(self, record: LayeredRecord, entries: list, jobs: list[_Job],
                            policies: dict[int, Any]) -> None:
        docker = self.p.docker
        assert docker is not None
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["id"] = docker.load_stream(tar_stream(entries), record.ref, record.image_id)
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                outcome["error"] = exc

        self.p.reporter.info(f"Loading {record.ref} into Docker"
                             + (" (still seeding for other peers)" if self._seeding(jobs) else ""))
        thread = threading.Thread(target=run, name="docker-load", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(self.p.opts.poll_interval)
            self._tend(jobs, policies)
        if "error" in outcome:
            raise outcome["error"]
        self.p.reporter.info(f"Loaded {record.ref} ({record.image_id})")

    def _seed_rest(self, record: LayeredRecord, jobs: list[_Job], policies: dict[int, Any]) -> None:
        if not self._seeding(jobs):
            return
        left = max(0.0, max(pol.deadline for pol in policies.values()) - time.monotonic())
        self.p.reporter.info(f"Seeding {record.ref} for other peers for up to {left:.0f} s (Ctrl-C stops)")
        while self._seeding(jobs):
            self._tend(jobs, policies)
            time.sleep(self.p.opts.poll_interval)
        self._stop_all()

    def _reseed_async(self, job: _Job) -> None:
        """Swap a finished layer's ctorrent for a fresh seeder (CtorrentProcess.reseed says why), in the background."""
        from docket.client.pull import reseeded

        if self.p.opts.seed_time <= 0 or job.reseed is not None:
            return
        seeding = sum(1 for j in self.jobs if j is not job and j.done and j.proc is not None and j.fetch is None
                      and j.proc.alive())
        if seeding >= MAX_SEEDERS:  # enough processes seed for this pull already: this one stops
            self._stop_async(job)
            return

        def run() -> None:
            job.proc = reseeded(job.proc, job.layer.digest)

        job.reseed = threading.Thread(target=run, name=f"reseed-{job.layer.hex[:12]}", daemon=True)
        job.reseed.start()

    def _join_reseeds(self) -> None:
        for job in self.jobs:
            if job.reseed is not None:
                job.reseed.join()

    def _stop_async(self, job: _Job) -> None:
        if getattr(job, "_stopping", None) is None:
            t = threading.Thread(target=self._stop_one, args=(job,), daemon=True)
            job._stopping = t  # type: ignore[attr-defined]
            t.start()

    @staticmethod
    def _stop_one(job: _Job) -> None:
        from docket.client.pull import STOP_WAIT

        with contextlib.suppress(Exception):
            job.proc.stop(timeout=STOP_WAIT)

    def _stop_all(self) -> None:
        """Stop every ctorrent we started, all at once from this thread (no thread per process: cleanup must work
        when no new thread can be started), and every HTTP fetch."""
        from docket.client.pull import STOP_WAIT

        self._join_reseeds()  # else a seeder could start after we stopped everything
        fetches = []
        for job in self.jobs:
            if job.fetch is not None and job.fetch.thread is not None:
                job.fetch.cancel.set()  # seen between chunks; a blocked read ends at its deadline
                fetches.append(job.fetch.thread)
        from docket.torrent.ctorrent import CtorrentProcess, stop_many

        procs = [job.proc for job in self.jobs if job.proc is not None]
        if all(isinstance(proc, CtorrentProcess) for proc in procs):
            stop_many(procs, STOP_WAIT)
        else:  # test doubles
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.stop(timeout=STOP_WAIT)
        deadline = time.monotonic() + FETCH_JOIN
        for t in fetches:
            t.join(max(0.0, deadline - time.monotonic()))
