"""The blob store: ``BlobStore`` (what the registry needs of one) and ``FileBlobStore``, its filesystem
implementation, the one owner of every on-disk path under ``<location>``.

Layout: ``blobs/sha256/<hex>`` (immutable content), ``torrents/<hex>.torrent``, ``uploads/`` (temp files while
receiving), ``seeders/<hex>/`` (a seeder's working directory), ``tracker/`` (managed opentracker's chroot).
Uploads go to a temp file, hashed while written, fsynced, then ``os.replace``d into place: a blob path either
does not exist or holds complete, verified bytes. Names from users never become paths; only digests do.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import queue
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import IO, Any, Protocol

from docket.errors import DocketError, InvalidRequest
from docket.reference import ANY_DIGEST_RE, DIGEST_ALGORITHMS
from docket.torrent.metainfo import PieceHasher

log = logging.getLogger(__name__)

UPLOAD_PREFIX = "upload-"
LOCK_FILE = "registry.lock"
SESSION_PREFIX = "session-"  # V2 upload sessions: uploads/session-<uuid4> (docket/registry/uploads.py)
_SESSION_ID_RE = re.compile(r"\A[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\Z")


def validate_digest(digest: str) -> str:
    """``sha256:<64 hex>`` or ``sha512:<128 hex>`` (lowercase) or InvalidRequest (digests become paths: strict)."""
    if not isinstance(digest, str) or not ANY_DIGEST_RE.fullmatch(digest):
        raise InvalidRequest(f"invalid digest {digest!r}", "a digest is sha256: followed by 64 lowercase hex digits "
                             "(or sha512: and 128)")
    return digest


def digest_hex(digest: str) -> str:
    return validate_digest(digest).split(":", 1)[1]


class LocationError(DocketError):
    status, code, exit_code = 500, "LOCATION_UNUSABLE", 10


# Chunks this big are hashed (sha256 and the torrent's SHA1 pieces) on a worker thread while the request thread
# reads and writes the next ones: one thread doing all of it ran at ~1 core and set the speed of a big push
# (benchmarks/README.md, throughput). hashlib releases the GIL for buffers this big.
PIPELINE_MIN = 64 * 1024
PIPELINE_DEPTH = 8  # chunks queued for the worker (with 1 MiB chunks: at most 8 MiB more memory per upload)


class Upload:
    """A temp file being received: write chunks, read ``digest``/``size``; removed unless committed."""

    def __init__(self, path: Path, fd: int, algorithm: str = "sha256", *, hasher: Any = None, size: int = 0) -> None:
        """``hasher`` and ``size``: continue a file that already holds ``size`` bytes hashed by ``hasher`` (a V2
        upload session, see ``BlobStore.reopen``); ``fd`` is then positioned at its end."""
        self.path = path
        self._file = os.fdopen(fd, "wb")
        self._sha = hasher if hasher is not None else hashlib.new(algorithm)
        self.algorithm = self._sha.name
        self.size = size
        self.committed = False
        self.pieces: PieceHasher | None = None  # torrent piece hashes, fed by write()
        self._queue: queue.Queue[bytes | None] | None = None
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None

    def write(self, chunk: bytes) -> None:
        self._file.write(chunk)
        if self._queue is None and len(chunk) >= PIPELINE_MIN:
            self._queue = queue.Queue(PIPELINE_DEPTH)
            self._worker = threading.Thread(target=self._hash_queued, name="upload-hash", daemon=True)
            self._worker.start()
        if self._queue is not None:
            self._queue.put(chunk)
        else:
            self._hash(chunk)
        self.size += len(chunk)

    def _hash(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        if self.pieces is not None:
            self.pieces.update(chunk)

    def _hash_queued(self) -> None:
        assert self._queue is not None
        while (chunk := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._hash(chunk)
                except BaseException as exc:  # noqa: BLE001 - raised in the request thread by _drain()
                    self._error = exc

    def _drain(self) -> None:
        """Wait until every written byte is hashed (the digest, the pieces and a V2 session's hasher are whole)."""
        if self._worker is not None and self._queue is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = self._queue = None
        if self._error is not None:
            raise self._error

    def finish(self) -> str:
        """Flush and fsync; the bytes are on disk when this returns. Returns the digest."""
        self._file.flush()
        os.fsync(self._file.fileno())  # while the worker hashes the last chunks
        self._drain()
        self._file.close()
        return self.digest

    def close(self) -> None:
        """Flush and close without fsync and without removing the file (a V2 upload session's chunk)."""
        self._drain()
        self._file.close()

    @property
    def digest(self) -> str:
        self._drain()
        return f"{self.algorithm}:{self._sha.hexdigest()}"

    def discard(self) -> None:
        with contextlib.suppress(BaseException):
            self._drain()
        with contextlib.suppress(OSError):
            self._file.close()
        if not self.committed:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


class BlobStore(Protocol):
    """Blobs by digest. Writers are ``Upload``s (hashed while written) that ``commit`` places atomically under
    their digest; ``local_path`` is for what must read a file by name (a seeder, send_file)."""

    def stat(self, digest: str) -> int | None: ...  # size, None when absent
    def open(self, digest: str, offset: int = 0) -> IO[bytes]: ...  # FileNotFoundError when absent
    def upload(self, algorithm: str = "sha256", *, pieces: bool = False,
               expected_size: int | None = None) -> AbstractContextManager[Upload]: ...
    def commit(self, upload: Upload, digest: str) -> None: ...
    def delete(self, digest: str) -> None: ...
    def digests(self) -> list[str]: ...
    def local_path(self, digest: str) -> Path: ...


class FileBlobStore:
    """Paths and atomic placement of blobs under one location directory (which also holds torrents/, seeders/
    and tracker/ for the swarm)."""

    def __init__(self, location: Path, *, shared: bool = False) -> None:
        """``shared``: registry instances on one PostgreSQL database serve this location together."""
        self.location = Path(location).absolute()
        self.shared = shared
        self.blobs_root = self.location / "blobs"
        self.blobs_dir = self.blobs_root / "sha256"  # sha512 blobs live beside it in blobs/sha512
        self.torrents_dir = self.location / "torrents"
        self.uploads_dir = self.location / "uploads"
        self.seeders_dir = self.location / "seeders"
        self.tracker_dir = self.location / "tracker"
        self._lock = threading.Lock()
        self._lock_fd: int | None = None  # the flock on LOCK_FILE while a registry serves this location

    # -- set-up ---------------------------------------------------------------------------------------------
    def ensure_layout(self) -> None:
        """Create the directories (0755) and prove the location is writable, with a clear error if not."""
        try:
            for d in (self.location, *(self.blobs_root / a for a in DIGEST_ALGORITHMS), self.torrents_dir,
                      self.uploads_dir, self.seeders_dir):
                d.mkdir(mode=0o755, parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.uploads_dir, prefix=".probe-"):
                pass
        except OSError as exc:
            raise LocationError(
                f"registry location {self.location} is not writable: {exc.strerror or exc}",
                "choose a writable directory with --location (or DOCKET_REGISTRY_LOCATION), or create it and give this "
                "user write access",
            ) from exc

    def lock(self) -> None:
        """Hold ``<location>/registry.lock`` (flock) while this process serves: a second registry on the same
        location would empty uploads/ under the first one's pushes, stop its seeders and run a second GC.

        ``self.shared``: registries on one PostgreSQL database share the location (docs/instances.md): each holds
        the lock shared, so none of them can run beside a registry that holds it alone (one on SQLite)."""
        shared = self.shared
        if self._lock_fd is not None:
            return
        path = self.location / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LocationError(f"cannot lock {path}: {exc.strerror or exc}",
                                    "check that this user may write the registry location") from exc
            if shared:
                raise LocationError(f"registry location {self.location} is in use by a docket-registry that "
                                    f"does not share it (pid {holder}, on SQLite)",
                                    "several instances on one location need one --db postgresql+psycopg://... "
                                    "for all of them") from exc
            raise LocationError(f"registry location {self.location} is in use by another docket-registry "
                                f"(pid {holder})",
                                "stop that one first, or give this one its own --location (several instances "
                                "can share one location only with --db postgresql+psycopg://...)") from exc
        if not shared:  # shared holders leave the file alone: it names the one exclusive holder
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """``lock`` for a while, then let go unless this process already held it (start-up work before serving)."""
        held = self._lock_fd is not None
        self.lock()
        try:
            yield
        finally:
            if not held:
                self.unlock()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def upload_files(self) -> list[Path]:
        """The files in uploads/ (temporary uploads and /v2 session parts; ``UploadSessions.sweep`` cleans them)."""
        if not self.uploads_dir.is_dir():
            return []
        return [e for e in self.uploads_dir.iterdir() if e.is_file() or e.is_symlink()]

    def writable(self) -> bool:
        try:
            with tempfile.NamedTemporaryFile(dir=self.uploads_dir, prefix=".probe-"):
                return True
        except OSError:
            return False

    # -- reading --------------------------------------------------------------------------------------------
    def local_path(self, digest: str) -> Path:
        algorithm, _, hex_ = validate_digest(digest).partition(":")
        return self.blobs_root / algorithm / hex_

    def stat(self, digest: str) -> int | None:
        try:
            return self.local_path(digest).stat().st_size
        except FileNotFoundError:
            return None

    def open(self, digest: str, offset: int = 0) -> IO[bytes]:
        f = open(self.local_path(digest), "rb")  # noqa: SIM115 - the caller closes it
        if offset:
            f.seek(offset)
        return f

    def digests(self) -> list[str]:
        found = []
        for algorithm in DIGEST_ALGORITHMS:
            folder = self.blobs_root / algorithm
            if folder.is_dir():
                found.extend(f"{algorithm}:{p.name}" for p in folder.iterdir()
                             if ANY_DIGEST_RE.match(f"{algorithm}:{p.name}"))
        return sorted(found)

    # -- writing --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def upload(self, algorithm: str = "sha256", *, pieces: bool = False,
               expected_size: int | None = None) -> Iterator[Upload]:
        """A temp file in uploads/, hashed with ``algorithm``; removed on failure or when the caller did not commit
        it."""
        fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, dir=self.uploads_dir)
        up = Upload(Path(name), fd, algorithm)
        if pieces:  # the .torrent's SHA1 pieces while receiving: no second read of the blob
            up.pieces = PieceHasher(expected_size)
        try:
            yield up
        finally:
            up.discard()

    def session_path(self, session_id: str) -> Path:
        """``uploads/session-<uuid4>``; anything but a lowercase uuid4 is refused (ids come from URLs)."""
        if not isinstance(session_id, str) or not _SESSION_ID_RE.fullmatch(session_id):
            raise InvalidRequest(f"invalid upload session id {session_id[:100]!r}", "ids are lowercase uuid4s")
        return self.uploads_dir / f"{SESSION_PREFIX}{session_id}"

    def create_session_file(self, session_id: str) -> Path:
        """An empty file for a new V2 upload session (O_EXCL: an id is never reused)."""
        path = self.session_path(session_id)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return path

    def reopen(self, path: Path, size: int, hasher: Any) -> Upload:
        """An Upload appending to the session file ``path`` after its first ``size`` bytes (anything after them,
        left by a failed request, is cut off), continuing ``hasher``. ``close()`` it after a chunk; ``finish()``
        (fsync) before ``commit``; ``discard()`` removes the file."""
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, size)
            os.lseek(fd, size, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return Upload(path, fd, hasher=hasher, size=size)

    def commit(self, upload: Upload, digest: str) -> None:
        """Move a finished upload into place as blob ``digest``; if the blob already exists, drop the temp.

        The caller computed ``digest`` while receiving; blobs are immutable, so an existing file wins.
        """
        dest = self.local_path(digest)
        with self._lock:
            if dest.is_file() and dest.stat().st_size == upload.size:
                upload.discard()
                return
            os.chmod(upload.path, 0o644)
            os.replace(upload.path, dest)
            upload.committed = True
            _fsync_dir(dest.parent)

    def delete(self, digest: str) -> None:
        """Remove a blob's file (GC; the DB row is the caller's, the torrent the swarm's)."""
        with contextlib.suppress(FileNotFoundError):
            self.local_path(digest).unlink()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
