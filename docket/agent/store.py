"""What the agent holds: verified blobs in the pull cache's layout, cached manifests, least-recently-used eviction.

The agent's cache directory is a ``docket pull`` location (client/cache.py: ``blobs/<hex>``, ``torrents/<hex>/``
with the blob's lock, .torrent and engine state), so a pull of the same location hands its layers to the agent and
the agent serves what the pull fetched. On top of it:

- ``torrents/<hex>/verified``: the blob's digest, size and mtime when its digest was last checked. A blob is
  served or seeded only while that record matches the file (a pull's blob, or a file changed behind our back, is
  hashed once more first). A download killed half-way has no record: it is resumed, never served.
- ``manifests/<alg>/<hex>`` (+ ``.type``): manifests and indexes fetched by digest or verified against one.
- eviction (``evict``): above ``--cache-size``, the blobs used longest ago (their record's mtime, touched on every
  use) go first; never one a local client is reading, one being downloaded, or one whose lock a pull holds.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from docket.client.cache import atomic_write, cache_dir, ensure_dir
from docket.client.digests import digest_algorithm, digest_file
from docket.reference import ANY_DIGEST_RE

log = logging.getLogger(__name__)

VERIFIED = "verified"


@dataclass
class Held:
    """One blob the cache holds, verified."""

    digest: str
    size: int
    blob: Path
    workdir: Path
    used: float  # last use (wall clock)

    @property
    def torrent(self) -> Path:
        return self.workdir / f"{self.blob.name}.torrent"


@dataclass
class StoreStats:
    """Evictions since start (read by /metrics)."""

    evictions: int = 0  # blobs evicted
    evicted_bytes: int = 0  # disk space they freed


class AgentStore:
    """The cache directory of one agent (thread-safe)."""

    def __init__(self, location: Path, max_bytes: int) -> None:
        self.location = ensure_dir(Path(location).absolute())
        self.blobs = cache_dir(self.location, "blobs")
        self.torrents = cache_dir(self.location, "torrents")
        self.manifests = cache_dir(self.location, "manifests")
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._readers: Counter[str] = Counter()
        self._busy: Counter[str] = Counter()  # downloads in progress
        self._evicting = threading.Lock()  # one pass at a time: two would both count the same blob as freed
        self.stats = StoreStats()

    # -- paths -----------------------------------------------------------------------------------------------
    @staticmethod
    def hex_of(digest: str) -> str:
        if not ANY_DIGEST_RE.fullmatch(digest):
            raise ValueError(f"not a digest: {digest!r}")
        return digest.split(":", 1)[1]

    def blob_path(self, digest: str) -> Path:
        return self.blobs / self.hex_of(digest)

    def workdir(self, digest: str) -> Path:
        return cache_dir(self.location, "torrents", self.hex_of(digest))

    # -- verified blobs --------------------------------------------------------------------------------------
    def verified(self, digest: str, size: int | None = None, *, check: bool = True) -> Held | None:
        """The blob when it is held and verified (hashed again when its record does not match the file, e.g. a
        pull's blob; ``check=False``: only the record is looked at)."""
        hexd = self.hex_of(digest)
        blob, workdir = self.blobs / hexd, self.torrents / hexd
        try:
            st = blob.stat()
        except FileNotFoundError:
            return None
        if size is not None and st.st_size != size:
            return None
        record = _read_record(workdir / VERIFIED)
        if record != {"digest": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}:
            if not check or not workdir.is_dir():
                return None
            if digest_file(blob, digest_algorithm(digest)) != digest:
                return None
            self.mark_verified(digest)
        with contextlib.suppress(OSError):
            used = (workdir / VERIFIED).stat().st_mtime
            return Held(digest, st.st_size, blob, workdir, used)
        return None

    def mark_verified(self, digest: str) -> None:
        hexd = self.hex_of(digest)
        st = (self.blobs / hexd).stat()
        atomic_write(self.workdir(digest) / VERIFIED,
                     json.dumps({"digest": digest, "size": st.st_size, "mtime_ns": st.st_mtime_ns}).encode())

    def touch(self, digest: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            os.utime(self.torrents / self.hex_of(digest) / VERIFIED)

    def held(self, *, check: bool = False) -> list[Held]:
        """Every verified blob: by its record alone (eviction), or with ``check`` also every blob without a
        matching record that hashes right (the agent's start: what pulls left, hashed once)."""
        out = []
        for entry in os.scandir(self.blobs):
            if not entry.is_file(follow_symlinks=False):
                continue
            for alg in ("sha256", "sha512"):
                digest = f"{alg}:{entry.name}"
                if ANY_DIGEST_RE.fullmatch(digest):
                    held = self.verified(digest, check=check)
                    if held is not None:
                        out.append(held)
        return out

    # -- readers and downloads -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def busy(self, digest: str) -> Iterator[None]:
        """A download of ``digest`` runs: it is not evicted."""
        with self._lock:
            self._busy[digest] += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy[digest] -= 1

    def reading(self, digest: str) -> Callable[[], None]:
        """A local client reads ``digest``: not evicted until the returned function is called (once)."""
        with self._lock:
            self._readers[digest] += 1
        done = threading.Event()

        def release() -> None:
            if not done.is_set():
                done.set()
                with self._lock:
                    self._readers[digest] -= 1

        return release

    def in_use(self, digest: str) -> bool:
        with self._lock:
            return self._readers[digest] > 0 or self._busy[digest] > 0

    # -- eviction --------------------------------------------------------------------------------------------
    def usage(self) -> int:
        total = 0
        for entry in os.scandir(self.blobs):
            with contextlib.suppress(OSError):
                if entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
        return total

    def evict(self, drop: Callable[[list[str]], None], need: int = 0) -> list[str]:
        """Remove the least recently used blobs until the cache holds at most ``max_bytes - need``; ``drop``
        stops seeding them first. Returns the evicted digests."""
        with self._evicting:
            return self._evict(drop, max(0, self.max_bytes - need))

    def _evict(self, drop: Callable[[list[str]], None], target: int) -> list[str]:
        used = self.usage()
        if used <= target:
            return []
        evicted = []
        for held in sorted(self.held(), key=lambda h: h.used):
            if used <= target:
                break
            if self.in_use(held.digest):
                continue
            lock = _try_lock(held.workdir / "lock")
            if lock is None:  # a pull (or our own download) holds it
                continue
            try:
                if self.verified(held.digest, check=False) is None or self.in_use(held.digest):
                    continue  # gone, changed, or taken by a reader since the listing
                drop([held.digest])
                freed = _blocks(held.blob)
                with contextlib.suppress(FileNotFoundError):
                    held.blob.unlink()
                for name in os.listdir(held.workdir):
                    if name != "lock":
                        with contextlib.suppress(OSError):
                            p = held.workdir / name
                            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
                used -= freed
                evicted.append(held.digest)
                self.stats.evictions += 1  # under _evicting: one pass at a time
                self.stats.evicted_bytes += freed
                log.info("evicted %s (%d bytes, last used %.0f s ago): the cache is over %d bytes", held.digest,
                         held.size, time.time() - held.used, self.max_bytes)
            finally:
                os.close(lock)
        return evicted

    # -- manifests -------------------------------------------------------------------------------------------
    def manifest(self, digest: str) -> tuple[bytes, str] | None:
        path = self._manifest_path(digest)
        try:
            return path.read_bytes(), path.with_name(path.name + ".type").read_text().strip()
        except (OSError, UnicodeDecodeError):
            return None

    def keep_manifest(self, digest: str, body: bytes, media_type: str) -> None:
        path = self._manifest_path(digest)
        ensure_dir(path.parent)
        atomic_write(path.with_name(path.name + ".type"), media_type.encode())
        atomic_write(path, body)

    def _manifest_path(self, digest: str) -> Path:
        alg = digest.split(":", 1)[0]
        return self.manifests / alg / self.hex_of(digest)


def _read_record(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_bytes()[:4096])
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _blocks(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except OSError:
        return 0


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd
