"""Layer pull (docs/layers.md, "Client pull"): config over HTTP, only the missing layers through BitTorrent
(one ctorrent per layer, in parallel), then a generated legacy ``docker load`` stream holding just those.

Used by ``Puller.pull`` for records with ``format == "layers"``; it reuses the Puller's options, reporter,
ctorrent factory, scraper and helpers so both formats behave alike (locks, cache, seeding policy).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from docket import errors
from docket.client.layers import load_entries, present_prefix, tar_stream
from docket.client.peer import choose_peer_ip
from docket.reference import DIGEST_RE, Reference
from docket.torrent.metainfo import TorrentMeta, read_torrent

if TYPE_CHECKING:
    from docket.client.pull import Puller, PullResult

log = logging.getLogger(__name__)
MAX_CONFIG = 64 * 1024 * 1024
_HEX40_LEN = 40


@dataclass(frozen=True)
class LayerInfo:
    digest: str
    size: int
    info_hash: str

    @property
    def hex(self) -> str:
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
            if not isinstance(obj, str) or not DIGEST_RE.match(obj):
                raise bad(field, obj)
            return obj

        def size_of(obj: Any, field: str, allow_zero: bool = False) -> int:
            if not isinstance(obj, int) or isinstance(obj, bool) or obj < 0 or (obj == 0 and not allow_zero):
                raise bad(field, obj)
            return obj

        config = data.get("config")
        if not isinstance(config, dict):
            raise bad("config", config)
        layers_raw = data.get("layers")
        if not isinstance(layers_raw, list) or not layers_raw:
            raise bad("layers", layers_raw)
        layers = []
        for i, item in enumerate(layers_raw):
            if not isinstance(item, dict):
                raise bad(f"layers[{i}]", item)
            ih = item.get("info_hash")
            if not isinstance(ih, str) or len(ih) != _HEX40_LEN or any(c not in "0123456789abcdef" for c in ih.lower()):
                raise bad(f"layers[{i}].info_hash", ih)
            layers.append(LayerInfo(digest_of(item.get("digest"), f"layers[{i}].digest"),
                                    size_of(item.get("size"), f"layers[{i}].size", allow_zero=True), ih.lower()))
        image_id = digest_of(data.get("image_id"), "image_id")
        config_digest = digest_of(config.get("digest"), "config.digest")
        if config_digest != image_id:
            raise bad("config.digest (differs from image_id)", config_digest)
        return cls(ref=ref, image_id=image_id, digest=digest_of(data.get("digest"), "digest"),
                   size=size_of(data.get("size"), "size"), config_digest=config_digest,
                   config_size=size_of(config.get("size"), "config.size"), layers=tuple(layers))


def check_config(record: LayeredRecord, config: bytes) -> list[str]:
    """The config came over plain HTTP: its sha256 must be the image id, its diff_ids the record's layers."""
    got = "sha256:" + hashlib.sha256(config).hexdigest()
    if got != record.config_digest:
        raise errors.IntegrityError(f"the config of {record.ref} hashes to {got}, expected {record.config_digest}",
                                    "the config was altered in transit or the registry is corrupt")
    try:
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
    except (ValueError, KeyError, TypeError) as exc:
        raise errors.IntegrityError(f"the config of {record.ref} has no rootfs.diff_ids") from exc
    if diff_ids != [layer.digest for layer in record.layers]:
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
    resumed: int = 0  # bytes already on disk from an interrupted pull (ctorrent's saved bitfield)

    @property
    def bitfield(self) -> Path:
        return self.workdir / f"{self.layer.hex}.bf"  # CtorrentProcess: <workdir>/<torrent stem>.bf


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

    # -- the whole pull ----------------------------------------------------------------------------------------

    def run(self, ref: Reference, data: dict[str, Any], start: float) -> PullResult:
        from docket.client.pull import PullResult, ensure_dir

        p, opts, rep = self.p, self.p.opts, self.p.reporter
        record = LayeredRecord.from_json(ref, data)
        if opts.load:
            if p.docker is None:
                raise errors.InvalidRequest("no Docker client to load the image into")
            p.docker.ping()
        config = p.api.get_blob(record.config_digest, MAX_CONFIG)
        diff_ids = check_config(record, config)
        by_digest = {layer.digest: layer for layer in record.layers}
        present = 0
        if opts.output is None and p.docker is not None:
            present = present_prefix(diff_ids, p.docker.local_chain_ids())
        needed = list(dict.fromkeys(diff_ids[present:]))
        bytes_present = sum(layer.size for layer in record.layers[:present])
        if present:
            rep.info(f"{present} of {len(diff_ids)} layers already in Docker ({bytes_present} bytes)")
        location = ensure_dir(opts.location)
        blobs_dir = ensure_dir(location / "blobs")
        for d in needed:
            layer = by_digest[d]
            torrent = p.api.get_torrent(d)
            meta = read_torrent(torrent)
            check_layer_torrent(meta, layer, ref)
            self.jobs.append(_Job(layer, meta, torrent, blobs_dir / layer.hex,
                                  ensure_dir(location / "torrents" / layer.hex)))
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
                    result.peer_ip = self._download(record, fetched)
                    if opts.seed_time <= 0:
                        self._stop_all()
                    self._verify(record, fetched)
            completed_at = max((getattr(j.proc, "completed_at", None) or time.monotonic() for j in fetched),
                               default=time.monotonic())
            blobs = {j.layer.digest: j.blob for j in self.jobs}
            entries = load_entries(str(ref), record.config_digest, config, diff_ids, blobs)
            if opts.output:
                result.output = str(write_output(entries, opts.output))
                rep.info(f"Wrote {result.output}")
            from docket.client.pull import _SeedPolicy

            policies = {id(j): _SeedPolicy(p, j.meta, completed_at, proc=j.proc) for j in fetched}
            if opts.load:
                self._load_while_seeding(record, entries, fetched, policies)
                result.loaded = True
            result.seconds = round(time.monotonic() - start, 3)
            result.extra = {
                "bytes_from_peers": sum(j.layer.size - j.resumed for j in fetched),
                "bytes_from_registry": len(config),
                "bytes_present": bytes_present,
                "bytes_cached": sum(j.layer.size for j in cached),
                "bytes_resumed": sum(j.resumed for j in fetched),
                "layers": len(diff_ids),
                "layers_downloaded": len(fetched),
                "layers_cached": len(cached),
                "layers_present": present,
            }
            self._seed_rest(record, fetched, policies)
        finally:
            self._stop_all()
        return result

    # -- steps -------------------------------------------------------------------------------------------------

    def _cached(self, job: _Job) -> bool:
        from docket.client.pull import sha256_file

        try:
            if job.blob.stat().st_size != job.layer.size:
                return False
        except FileNotFoundError:
            return False
        resumed = bitfield_bytes(job.bitfield, job.meta)
        if resumed is not None and resumed < job.layer.size:
            return False  # an interrupted download (the file may be full-size but sparse): ctorrent resumes it
        if sha256_file(job.blob) == job.layer.digest:
            return True
        self.p._discard(job.blob, job.workdir)
        return False

    def _download(self, record: LayeredRecord, jobs: list[_Job]) -> str | None:
        from docket.client.pull import _atomic_write, ensure_space

        p, opts = self.p, self.p.opts
        ensure_space(jobs[0].blob.parent, [(j.blob, j.layer.size) for j in jobs])
        peer_ip = choose_peer_ip(jobs[0].meta.announce, opts.peer_ip)
        exit_hours = max(1, math.ceil(opts.seed_time / 3600))
        total = sum(j.layer.size for j in jobs)
        via = f" as peer {peer_ip}" if peer_ip else ""
        p.reporter.info(f"Downloading {len(jobs)} layer(s) of {record.ref} ({total} bytes) through BitTorrent{via}")
        for job in jobs:
            torrent_path = job.workdir / f"{job.layer.hex}.torrent"
            _atomic_write(torrent_path, job.torrent)
            if job.layer.size == 0:  # nothing to transfer; ctorrent cannot make a 0-byte torrent anyway
                job.blob.write_bytes(b"")
                job.done = True
                continue
            job.resumed = bitfield_bytes(job.bitfield, job.meta) or 0
            if job.resumed:
                p.reporter.info(f"Resuming layer {job.layer.digest}: {job.resumed} bytes already downloaded")
            job.proc = p._new_ctorrent(torrent=torrent_path, save_as=job.blob, workdir=job.workdir,
                                       listen_ip=peer_ip, port=opts.peer_port, exit_hours=exit_hours,
                                       log_path=job.workdir / "ctorrent.log")
            job.proc.start()
        last_total, last_progress = -1, time.monotonic()
        with p.reporter.task(f"Downloading {record.ref}", total or None) as task:
            while True:
                now = time.monotonic()
                got, rate = 0, 0.0
                for job in jobs:
                    if job.done:
                        got += job.layer.size
                        continue
                    proc = job.proc
                    if proc.completed.is_set():
                        job.done = True
                        got += job.layer.size
                        continue
                    st = proc.status
                    if st is not None and st.total:
                        got += min(job.layer.size, st.have * job.meta.piece_length)
                        rate += st.down_kbps * 1024
                        if st.have >= st.total:
                            job.all_pieces_since = job.all_pieces_since or now
                            if now - job.all_pieces_since >= opts.complete_grace:
                                job.done = True
                    if not job.done and not proc.alive() and not proc.completed.is_set():
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
                    stuck = next(j for j in jobs if not j.done)
                    p.proc = stuck.proc
                    raise p._transfer_error(
                        f"no download progress for {opts.stall_timeout:g} s pulling {record.ref} "
                        f"(layer {stuck.layer.digest})", stuck.meta,
                        "is the tracker reachable from this host, and is the registry seeding (docket-registry's "
                        "/healthz)? a retry resumes the partial files; raise --stall-timeout for slow links")
                time.sleep(opts.poll_interval)
        return peer_ip

    def _verify(self, record: LayeredRecord, jobs: list[_Job]) -> None:
        from docket.client.pull import sha256_file

        total = sum(j.layer.size for j in jobs)
        base = 0
        with self.p.reporter.task("Verifying sha256", total or None) as task:
            for job in jobs:
                try:
                    digest = sha256_file(job.blob, lambda n, b=base: task.update(b + n))
                except FileNotFoundError as exc:
                    raise errors.TransferError(f"ctorrent reported completion but {job.blob} is missing") from exc
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
        """Stop every ctorrent we started, in parallel (each stop can take a few seconds)."""
        threads = []
        for job in self.jobs:
            if job.proc is not None:
                t = threading.Thread(target=self._stop_one, args=(job,), daemon=True)
                t.start()
                threads.append(t)
        for t in threads:
            t.join()
