"""Pull orchestration: metadata -> checked torrent -> ctorrent download -> sha256 -> docker load, seeding meanwhile.

``--transport``: "p2p" (BitTorrent only), "http" (the registry over HTTP only, no ctorrent), "auto" (BitTorrent,
then HTTP, resumed from the pieces already verified, when the swarm gives nothing: http_fetch.py).

No click here: the CLI passes a ``Reporter`` (progress.py) and reads the returned ``PullResult``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import math
import os
import re
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from docket import errors
import requests

from docket.client.api import RegistryClient
from docket.deadline import DeadlineSession
from docket.client.http_fetch import MAX_BLOB_SIZE, HttpFetch, check_torrent_size, piece_hashes
from docket.client.dockerops import DockerOps
from docket.client.peer import choose_peer_ip
from docket.client.progress import Reporter, SilentReporter, printable
from docket.reference import DIGEST_RE, Reference
from docket.torrent.metainfo import TorrentMeta, read_torrent

log = logging.getLogger(__name__)

_HEX40 = re.compile(r"\A[0-9a-f]{40}\Z")
DIR_MODE = 0o700
# an /v2 "artifact" whose type is an image config: an image docket cannot pull (e.g. non-distributable layers)
IMAGE_CONFIG_TYPES = frozenset({"application/vnd.docker.container.image.v1+json",
                                "application/vnd.oci.image.config.v1+json"})
STOP_WAIT = 2.0  # seconds between ctorrent's first SIGTERM and the next
TRANSPORTS = ("auto", "p2p", "http")
DEFAULT_FALLBACK_AFTER = 20.0  # s without swarm progress; ctorrent retries a failed tracker announce every ~15 s
TRACKER_DEADLINE = 5.0  # a whole scrape of the tracker (connect and each read: 2 s)
PIDFILE = "ctorrent.pid"  # in a blob's work directory: the pid of the ctorrent writing it (an orphan's too)
_BOILERPLATE = ("META INFO", "Announce:", "Piece length:", "Created with:", "Creation date:", "FILES INFO", "<1> ",
                "Total:", "Creating file", "Press 'h'", "End of input reached", "Input channel is now off")


@dataclass(frozen=True)
class ImageRecord:
    """The registry's image record, checked field by field (it came from the network)."""

    ref: Reference
    image_id: str
    digest: str
    size: int
    info_hash: str
    created: str = ""

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @classmethod
    def from_json(cls, ref: Reference, data: dict[str, Any]) -> ImageRecord:
        def bad(field: str) -> errors.IntegrityError:
            return errors.IntegrityError(f"the registry's record for {ref} has an invalid {field}: "
                                         f"{data.get(field)!r}", "the registry is incompatible or broken")

        digest, image_id, info_hash, size = (data.get("digest"), data.get("image_id"), data.get("info_hash"),
                                             data.get("size"))
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise bad("digest")
        if not isinstance(image_id, str) or not DIGEST_RE.match(image_id):
            raise bad("image_id")
        if not isinstance(info_hash, str) or not _HEX40.match(info_hash.lower()):
            raise bad("info_hash")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_BLOB_SIZE:
            raise bad("size")
        return cls(ref=ref, image_id=image_id, digest=digest, size=size, info_hash=info_hash.lower(),
                   created=str(data.get("created") or ""))


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
    max_download_rate: int | None = None  # KB/s cap per ctorrent (-D); None: unlimited
    transport: str = "auto"  # "auto" | "p2p" | "http" (see the module docstring)
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
    downloaded: bool = True  # False when a verified copy was already in the cache
    peer_ip: str | None = None
    tracker: str | None = None
    format: str = "tarball"
    extra: dict[str, Any] = field(default_factory=dict)  # bytes_from_peers, bytes_from_http, transport, ...

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        out = {k: d[k] for k in ("ref", "digest", "image_id", "bytes", "seconds", "loaded", "output")}
        if self.format != "tarball":
            out["format"] = self.format
        out.update(self.extra)
        return out


def check_torrent(meta: TorrentMeta, record: ImageRecord) -> None:
    """The .torrent came over plain HTTP: it must describe exactly the blob the metadata promised."""
    if meta.info_hash != record.info_hash:
        raise errors.IntegrityError(
            f"the torrent for {record.ref} has info hash {meta.info_hash}, but the registry's metadata says "
            f"{record.info_hash}", "the torrent was altered in transit or the registry is inconsistent; nothing "
            "was downloaded")
    if meta.length != record.size:
        raise errors.IntegrityError(
            f"the torrent for {record.ref} describes {meta.length} bytes, but the image is {record.size} bytes",
            "the registry is inconsistent; re-push the image")


def sha256_file(path: Path, progress: Callable[[int], None] | None = None) -> str:
    from docket.client.http_fetch import digest_file

    return digest_file(path, "sha256", progress)


def ensure_dir(path: Path) -> Path:
    """mkdir -p with 0700 for what we create (never 0644); existing directories are left as they are."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.DocketError(f"cannot create directory {path}: {exc.strerror}",
                                 "choose another --location or fix its permissions") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise errors.DocketError(f"cannot write in {path}: permission denied",
                                 "choose another --location (DOCKET_LOCATION) or fix its permissions")
    return path


def cache_dir(location: Path, *parts: str) -> Path:
    """``location/parts...`` created 0700, refused when any part is a symbolic link; symbolic links directly
    inside it are removed. Why: the cache never makes links, and ctorrent and our writers follow them, so a link
    planted in a shared cache (``blobs`` -> /etc, ``<hex>.bf`` -> a victim file) would have a pull write outside
    --location. (--location itself may be a link: the user chose it.)"""
    path = location
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise errors.DocketError(f"{path} is a symbolic link: docket writes nothing through links in its cache",
                                     "remove the link (docket creates the directory again) or choose another "
                                     "--location (DOCKET_LOCATION)")
    ensure_dir(path)
    if len(parts) > 1:  # a blob's work directory: every file in it is ours
        for entry in os.scandir(path):
            if entry.is_symlink():
                unlink_link(Path(entry.path))
    return path


def unlink_link(path: Path) -> Path:
    """Remove a symbolic link at ``path`` (we are about to write there; see cache_dir); ``path`` back."""
    if path.is_symlink():
        log.warning("removing the symbolic link %s in the cache: docket writes nothing through links", path)
        path.unlink()
    return path


@contextlib.contextmanager
def blob_lock(path: Path, reporter: Reporter, what: str) -> Iterator[None]:
    """One downloader per blob per host: a second pull waits, then finds the verified file.

    Holding the lock, the ctorrent a killed earlier pull left writing this blob (its pid in ``PIDFILE``, its
    command line naming this work directory, no docket pull its parent) is stopped: two writers must never share
    the file. A live pull's ctorrent (still seeding after that pull released the lock) is left alone.
    """
    try:
        f = open(path, "a+b")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise errors.DocketError(f"cannot open {path}: {exc.strerror or exc}", local_error_hint(exc)) from exc
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            reporter.info(f"Another docket pull is fetching {what}; waiting for it")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        if stop_orphan_writer(path.parent):
            reporter.info(f"Stopped a ctorrent an interrupted pull left running on {what}")
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _parent_is_a_pull(pid: int) -> bool:
    """True when ``pid``'s parent is this process or another running ``docket`` command."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == os.getpid():
            return True
        argv = Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, StopIteration):
        return False
    return any(os.path.basename(a) == b"docket" or a.startswith(b"docket.client") for a in argv)


def stop_orphan_writer(workdir: Path) -> bool:
    """Stop the ctorrent recorded in ``workdir``'s ``PIDFILE`` if it outlived its pull (processes.stop_orphan
    checks it is a ctorrent naming ``workdir``); True when one was stopped."""
    from docket.torrent.processes import stop_orphan

    pid_file = workdir / PIDFILE
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    if _parent_is_a_pull(pid):
        return False
    return stop_orphan(pid_file, "ctorrent", str(workdir))


def local_error_hint(exc: OSError) -> str:
    """What to do about a local file operation that failed, by its errno (never "install ctorrent")."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return "too many open files: raise the limit (ulimit -n) or pull an image with fewer layers"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space, or point --location (DOCKET_LOCATION) at a larger disk"
    return "choose another --location (DOCKET_LOCATION) or fix its permissions"


def check_output_path(output: Path) -> Path:
    """The absolute ``-o/--output`` path, refused up front when it cannot be written as a file."""
    output = output.expanduser().absolute()
    if not output.parent.is_dir():
        raise errors.InvalidRequest(f"cannot write {output}: {output.parent} is not a directory",
                                    "create the directory first or choose another -o/--output")
    if output.is_dir():
        raise errors.InvalidRequest(f"-o/--output {output} is a directory", "give a file name")
    try:
        mode = output.lstat().st_mode
    except FileNotFoundError:
        return output
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):  # the tarball would replace a device (/dev/null), a fifo
        raise errors.InvalidRequest(f"-o/--output {output} exists and is not a regular file",
                                    "give the name of a new or regular file")
    return output


def place_output(blob: Path, output: Path) -> Path:
    """Put the verified tarball at ``output``: hardlink when possible, else copy; atomic replace either way."""
    output = check_output_path(output)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.unlink()
        try:
            os.link(blob, tmp)
        except OSError:
            shutil.copyfile(blob, tmp)
            os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise errors.DocketError(f"cannot write {output}: {exc.strerror or exc}") from exc
    return output


class Puller:
    """One pull. ``docker`` may be None with ``load=False``."""

    def __init__(self, api: RegistryClient, docker: DockerOps | None, options: PullOptions,
                 reporter: Reporter | None = None,
                 ctorrent_factory: Callable[..., Any] | None = None,
                 scraper: Callable[..., Any] | None = None) -> None:
        self.api = api
        self.docker = docker
        self.opts = options
        self.reporter = reporter or SilentReporter()
        self._ctorrent_factory = ctorrent_factory
        self._scraper = scraper
        self.proc: Any = None
        self.fallback_reason: str | None = None  # why HTTP took over (tarball format; layers keep their own)
        self.http_fetch: HttpFetch | None = None
        self._tracker_http: DeadlineSession | None = None

    def warn(self, text: str) -> None:
        """A warning line (the reporter's ``warning`` when it has one)."""
        warning = getattr(self.reporter, "warning", None)
        if warning is not None:
            warning(text)
        else:
            self.reporter.info(f"Warning: {text}")

    def tracker_unreachable(self, announce: str, info_hash: str) -> str | None:
        """Why the tracker cannot be reached at all (connection refused, timeout, ...), else None.

        One scrape: any HTTP answer, even an error, means it is reachable and BitTorrent gets its chance.
        """
        try:
            self._scrape(announce, info_hash)
        except errors.ServiceUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, requests.exceptions.RequestException):
                text = str(cause)
                if isinstance(cause, requests.exceptions.Timeout):
                    return "timed out"
                if "refused" in text.lower():
                    return "connection refused"
                if "resolve" in text.lower() or "Name or service" in text:
                    return "host name not resolved"
                return "cannot connect"
        except Exception as exc:  # noqa: BLE001 - unknown is not "down": BitTorrent gets its chance
            log.debug("tracker probe of %s: %s", announce, exc)
        return None

    # -- steps ---------------------------------------------------------------------------------------------

    def fetch(self, ref: Reference) -> tuple[ImageRecord, bytes, TorrentMeta]:
        """Metadata and torrent, cross-checked before anything touches the disk."""
        record = ImageRecord.from_json(ref, self.api.get_image(ref))
        torrent = self.api.get_torrent(record.digest)
        meta = read_torrent(torrent)
        check_torrent(meta, record)
        check_torrent_size(torrent, meta.pieces, record.digest)
        return record, torrent, meta

    def pull(self, ref: Reference) -> PullResult:
        start = time.monotonic()
        if self.opts.output:  # before any download, not after it
            self.opts.output = check_output_path(self.opts.output)
        self.reporter.info(f"Pulling {ref} from the Docket registry at {self.api.url}")
        data = self.api.get_image(ref)
        if data.get("format") == "layers":
            from docket.client.pull_layers import LayerPull

            return LayerPull(self).run(ref, data, start)
        if data.get("format") in ("index", "artifact"):
            kind = data.get("artifact_type") or data.get("media_type") or "unknown type"
            what = "a multi-platform image index" if data["format"] == "index" else \
                f"an OCI artifact ({kind})" if kind not in IMAGE_CONFIG_TYPES else \
                "an image whose layers are not all in the registry (non-distributable layers fetched from other " \
                "URLs) or not all listed by its config"
            raise errors.InvalidRequest(
                f"{ref} is {what} pushed through the registry's /v2 API; docket pulls single-platform images only",
                f"use a standard client: docker pull / skopeo copy / oras pull <registry host:port>/{ref}")
        record = ImageRecord.from_json(ref, data)
        torrent = self.api.get_torrent(record.digest)
        meta = read_torrent(torrent)
        check_torrent(meta, record)
        check_torrent_size(torrent, meta.pieces, record.digest)
        if self.opts.load:
            if self.docker is None:
                raise errors.InvalidRequest("no Docker client to load the image into")
            self.docker.ping()  # fail now, not after the download, if the daemon is down
        location = ensure_dir(self.opts.location)
        blobs = cache_dir(location, "blobs")
        workdir = cache_dir(location, "torrents", record.hex)
        blob = unlink_link(blobs / record.hex)
        result = PullResult(ref=str(ref), digest=record.digest, image_id=record.image_id, bytes=record.size,
                            seconds=0.0, loaded=False, output=None, tracker=meta.announce)
        try:
            with blob_lock(workdir / "lock", self.reporter, record.digest):
                if self._cached(blob, record):
                    result.downloaded = False
                    self.reporter.info(f"Already downloaded: {record.digest} (verified)")
                else:
                    result.peer_ip = self._transfer(record, meta, torrent, blob, workdir)
                    if self.opts.seed_time <= 0:
                        self._stop_ctorrent()
                    else:
                        self.proc = reseeded(self.proc, record.digest)
                    self._verify(blob, record, workdir)
            fetch = self.http_fetch
            http = fetch.received if fetch else 0
            transport = ("none" if not result.downloaded else "p2p" if fetch is None
                         else "http" if self.proc is None or http >= record.size else "p2p+http")
            result.extra = {"transport": transport, "transport_requested": self.opts.transport,
                            "bytes_from_http": http, "fallback_reason": self.fallback_reason}
            # seed-time counts from ctorrent's "Download complete.", not from the end of our verification
            completed_at = getattr(self.proc, "completed_at", None) or time.monotonic()
            if self.opts.output:
                result.output = str(place_output(blob, self.opts.output))
                self.reporter.info(f"Wrote {result.output}")
            policy = _SeedPolicy(self, meta, completed_at)
            if self.opts.load:
                self._load_while_seeding(blob, record, policy)
                result.loaded = True
            result.seconds = round(time.monotonic() - start, 3)
            self._seed_rest(record, policy)
        finally:
            self._stop_ctorrent()
        return result

    # -- helpers -------------------------------------------------------------------------------------------

    def _transfer(self, record: ImageRecord, meta: TorrentMeta, torrent: bytes, blob: Path,
                  workdir: Path) -> str | None:
        """The whole-tarball blob by the chosen transport; the peer ip when ctorrent ran."""
        mode = self.opts.transport
        if mode == "auto":
            why = self.tracker_unreachable(meta.announce, meta.info_hash)
            if why:
                self.fallback_reason = f"tracker {meta.announce} unreachable ({why})"
                self.warn(f"the tracker {meta.announce} is unreachable ({why}); downloading over HTTP from "
                          f"the registry at {self.api.url} instead")
                mode = "http"
        if mode == "http":
            ensure_space(blob.parent, [(blob, record.size)])
            self.reporter.info(f"Downloading {record.digest} ({record.size} bytes) over HTTP from {self.api.url}")
            self._http_download(record, meta, torrent, blob, workdir)
            return None
        torrent_path = workdir / f"{record.hex}.torrent"
        _atomic_write(torrent_path, torrent)
        return self._download(record, meta, torrent_path, blob, workdir, torrent)

    def _http_download(self, record: ImageRecord, meta: TorrentMeta, torrent: bytes, blob: Path,
                       workdir: Path) -> None:
        """Fetch what the pieces on disk lack over HTTP (Range), with progress and the stall timeout."""
        fetch = self.http_fetch = HttpFetch(self.api, record.digest, record.size, blob, meta.piece_length,
                                            piece_hashes(torrent)).start()
        last, last_progress = -1, time.monotonic()
        try:
            with self.reporter.task(f"Downloading {record.ref} over HTTP", record.size) as task:
                while not fetch.wait(self.opts.poll_interval):
                    now = time.monotonic()
                    if fetch.progress > last:
                        last, last_progress = fetch.progress, now
                    task.update(fetch.progress)
                    if now - last_progress > self.opts.stall_timeout:
                        raise errors.TransferError(
                            f"no download progress for {self.opts.stall_timeout:g} s pulling {record.ref} over HTTP "
                            f"from {self.api.url}", "a retry resumes the partial file")
                task.update(fetch.progress)
        finally:
            fetch.cancel.set()
        if fetch.error is not None:
            raise fetch.error
        for bf in workdir.glob("*.bf"):  # ctorrent's bitfield no longer describes the file
            with contextlib.suppress(FileNotFoundError):
                bf.unlink()

    def _cached(self, blob: Path, record: ImageRecord) -> bool:
        try:
            if blob.stat().st_size != record.size:
                return False
        except FileNotFoundError:
            return False
        with self.reporter.task("Checking cached blob", record.size) as task:
            digest = sha256_file(blob, task.update)
        if digest == record.digest:
            return True
        self.reporter.info("The cached copy is complete but corrupt; downloading it again")
        self._discard(blob, blob.parent.parent / "torrents" / record.hex)
        return False

    @staticmethod
    def _discard(blob: Path, workdir: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            blob.unlink()
        for bf in workdir.glob("*.bf"):
            with contextlib.suppress(FileNotFoundError):
                bf.unlink()

    def _new_ctorrent(self, **kw: Any) -> Any:
        if self.opts.max_download_rate:  # bandwidth cap, per ctorrent (ctorrent -D, KB/s)
            kw["extra_args"] = [*kw.get("extra_args", []), "-D", str(int(self.opts.max_download_rate))]
        if self._ctorrent_factory is not None:
            return self._ctorrent_factory(**kw)
        from docket.torrent.ctorrent import CtorrentProcess

        # dies with the pull (SIGKILL, SIGHUP, a crash); its pid lets the next pull stop it if it outlives us anyway
        return CtorrentProcess(**kw, die_with_parent=True, pid_file=Path(kw["workdir"]) / PIDFILE)

    def _scrape(self, announce: str, info_hash: str) -> Any:
        if self._scraper is not None:
            return self._scraper(announce, info_hash)
        from docket.torrent.tracker import scrape

        if self._tracker_http is None:  # no registry token here: this session only talks to the tracker
            self._tracker_http = DeadlineSession(TRACKER_DEADLINE)
        return scrape(announce, info_hash, timeout=2.0, session=self._tracker_http)

    def _diagnosis(self) -> str:
        """What ctorrent's last status says about why nothing arrives."""
        proc = self.proc
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

    def _transfer_error(self, message: str, meta: TorrentMeta, hint: str) -> errors.TransferError:
        tail: list[str] = []
        with contextlib.suppress(Exception):
            if self.proc is not None:
                tail = [ln for ln in self.proc.tail(40) if ln.strip() and not ln.startswith(_BOILERPLATE)][-8:]
        said = ("\n  ctorrent said:\n    " + "\n    ".join(printable(ln, 300) for ln in tail)) if tail else ""
        return errors.TransferError(f"{message} (tracker {meta.announce}){self._diagnosis()}{said}", hint)

    def _download(self, record: ImageRecord, meta: TorrentMeta, torrent_path: Path, blob: Path,
                  workdir: Path, torrent: bytes = b"") -> str | None:
        ensure_space(blob.parent, [(blob, record.size)])
        peer_ip = choose_peer_ip(meta.announce, self.opts.peer_ip)
        exit_hours = max(1, math.ceil(self.opts.seed_time / 3600))  # orphans die eventually
        self.proc = self._new_ctorrent(torrent=torrent_path, save_as=blob, workdir=workdir, listen_ip=peer_ip,
                                       port=self.opts.peer_port, exit_hours=exit_hours,
                                       log_path=workdir / "ctorrent.log")
        via = f" as peer {peer_ip}" if peer_ip else ""
        self.reporter.info(f"Downloading {record.digest} ({record.size} bytes) through BitTorrent{via}")
        self.proc.start()
        proc = self.proc
        piece = meta.piece_length
        last_have, last_progress = -1, time.monotonic()
        all_pieces_since: float | None = None
        auto = self.opts.transport == "auto"
        swarm_progress = last_progress
        fall_back: str | None = None
        with self.reporter.task(f"Downloading {record.ref}", record.size) as task:
            while True:
                if proc.completed.is_set():
                    task.update(record.size)
                    break
                st = proc.status
                now = time.monotonic()
                if st is not None and st.total:
                    if st.have > last_have:
                        last_have, last_progress = st.have, now
                        swarm_progress = now
                    elif st.down_kbps > 0:  # a big piece on a slow link: bytes arrive, no piece yet
                        swarm_progress = now
                    task.update(min(record.size, st.have * piece), st.down_kbps * 1024)
                    if st.have >= st.total:
                        all_pieces_since = all_pieces_since or now
                        if now - all_pieces_since >= self.opts.complete_grace:
                            break
                if not proc.alive():
                    if proc.completed.is_set():
                        continue
                    if auto:
                        fall_back = "ctorrent exited"
                        break
                    raise self._transfer_error(
                        f"ctorrent exited before {record.ref} was downloaded", meta,
                        "check the tail of ctorrent's output above; the partial file is kept and a retry resumes it")
                if auto and now - swarm_progress >= self.opts.fallback_after:
                    fall_back = f"no progress from the swarm for {now - swarm_progress:.0f} s"
                    break
                if now - last_progress > self.opts.stall_timeout:
                    raise self._transfer_error(
                        f"no download progress for {self.opts.stall_timeout:g} s pulling {record.ref}", meta,
                        "is the tracker reachable from this host, and is the registry seeding (docket-registry's "
                        "/healthz)? a retry resumes the partial file; raise --stall-timeout for slow links")
                time.sleep(self.opts.poll_interval)
        if fall_back:
            self.fallback_reason = fall_back + self._diagnosis()
            self.warn(f"{record.ref}: {self.fallback_reason}; continuing over HTTP from the registry at {self.api.url}")
            self._stop_ctorrent()  # one writer per file
            self._http_download(record, meta, torrent, blob, workdir)
        return peer_ip

    def _verify(self, blob: Path, record: ImageRecord, workdir: Path) -> None:
        with self.reporter.task("Verifying sha256", record.size) as task:
            try:
                digest = sha256_file(blob, task.update)
            except FileNotFoundError as exc:
                raise errors.TransferError(f"ctorrent reported completion but {blob} is missing") from exc
        if digest != record.digest:
            self._stop_ctorrent()
            self._discard(blob, workdir)
            raise errors.IntegrityError(
                f"the downloaded blob for {record.ref} has digest {digest}, expected {record.digest}",
                "the bad file was deleted; pull again (if it repeats, the registry's blob is corrupt)")
        self.reporter.info(f"Verified {record.digest}")

    def _seeding(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def _load_while_seeding(self, blob: Path, record: ImageRecord, seeder: _SeedPolicy) -> None:
        assert self.docker is not None
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["id"] = self.docker.load(blob, record.ref, record.image_id)  # type: ignore[union-attr]
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                outcome["error"] = exc

        self.reporter.info(f"Loading {record.ref} into Docker"
                           + (" (still seeding for other peers)" if self._seeding() else ""))
        thread = threading.Thread(target=run, name="docker-load", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(self.opts.poll_interval)
            if self._seeding() and seeder.done():
                self._stop_ctorrent()
        if "error" in outcome:
            raise outcome["error"]
        self.reporter.info(f"Loaded {record.ref} ({record.image_id})")

    def _seed_rest(self, record: ImageRecord, seeder: _SeedPolicy) -> None:
        if not self._seeding():
            return
        left = max(0.0, seeder.deadline - time.monotonic())
        self.reporter.info(f"Seeding {record.ref} for other peers for up to {left:.0f} s (Ctrl-C stops)")
        while self._seeding() and not seeder.done():
            time.sleep(self.opts.poll_interval)
        self._stop_ctorrent()

    def _stop_ctorrent(self) -> None:
        # The first SIGTERM makes ctorrent announce "stopped" and then linger (seen: > 5 s); the second ends it.
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stop(timeout=STOP_WAIT)


def reseeded(proc: Any, digest: str) -> Any:
    """``proc`` (a finished download's ctorrent) swapped for a fresh seeder (CtorrentProcess.reseed says why);
    ``proc`` itself when it cannot be: not finished, gone, or a test double. A failure only loses the seeding."""
    if proc is None or not proc.completed.is_set() or not proc.alive() or not hasattr(proc, "reseed"):
        return proc
    try:
        return proc.reseed()
    except Exception as exc:  # noqa: BLE001 - the blob is downloaded; only seeding is lost
        log.warning("could not restart ctorrent as a seeder for %s: %s", digest, exc)
        return proc


def ensure_space(directory: Path, files: list[tuple[Path, int]]) -> None:
    """Fail before downloading, not halfway, when ``directory`` cannot hold the ``(path, size)`` files.

    Bytes already on disk (a resumed download) count as written.
    """
    needed = 0
    for path, size in files:
        try:
            have = path.stat().st_blocks * 512  # allocated bytes: ctorrent's files may be sparse
        except OSError:
            have = 0
        needed += max(0, size - have)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise errors.NoSpace(
            f"not enough disk space in {directory}: the download needs {needed} more bytes, {free} are free",
            "free some space, or point --location (DOCKET_LOCATION) at a larger disk",
        )


class _SeedPolicy:
    """Seed until ``seed_time`` after completion, or earlier once the tracker's scrape shows, twice in a row, no
    incomplete peer at all (ourselves included: the seeder that replaces our finished download announces our
    address and port as complete at once, see CtorrentProcess.reseed).

    Before that replacement the scrape lagged (ctorrent announces "completed" only at its next regular announce),
    so across hosts a pull seeded the whole ``seed_time``. An earlier rule also stopped when our ctorrent had no
    downloading peer connected; in the swarm benchmark it fired on finished peers while stragglers still needed them (all
    pulls gone at 28-29 s, the last host done at 21.6-22.3 s instead of 14.5-14.8 s: benchmarks/README.md, tuning
    runs C and D), so it was removed. So was counting one incomplete peer as "probably us" for 20 s after
    completion: with one straggler left, every finished peer took the straggler for itself and left (all pulls
    gone at 29.7 s, the straggler done at 23.4 s instead of ~14.5 s: benchmarks/README.md, run 3).
    """

    def __init__(self, puller: Puller, meta: TorrentMeta, completed_at: float, proc: Any = None) -> None:
        self.p = puller
        self._proc = proc  # layer pulls: one policy per ctorrent; else the puller's one
        self.meta = meta
        self.deadline = completed_at + puller.opts.seed_time
        self.zero_polls = 0
        self.next_scrape = 0.0
        self.completed_at = completed_at

    def done(self) -> bool:
        now = time.monotonic()
        if now >= self.deadline:
            return True
        if now >= self.next_scrape:
            self.next_scrape = now + self.p.opts.scrape_interval
            try:
                res = self.p._scrape(self.meta.announce, self.meta.info_hash)
                log.debug("scrape %s: complete=%s incomplete=%s", self.meta.info_hash, res.complete, res.incomplete)
                self.zero_polls = self.zero_polls + 1 if res.incomplete <= 0 else 0
            except Exception as exc:  # noqa: BLE001 - unknown is not "nobody"
                log.debug("scrape failed: %s", exc)
                self.zero_polls = 0
        return self.zero_polls >= 2


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
