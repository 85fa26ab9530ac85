"""A blob over plain HTTP from the registry, resumable: the fallback when the swarm gives nothing.

ctorrent preallocates its file, so neither the file's size nor its allocated blocks say which bytes are real.
What is on disk is therefore checked piece by piece against the torrent's SHA-1 piece hashes; only the runs of
pieces that fail are requested, one ``Range`` request per run, and every piece received is checked against its
hash as it arrives (a corrupt response is refused at the first bad piece). The caller still verifies the whole
blob's digest afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from docket import errors
from docket.client.api import RegistryClient
from docket.torrent.bandwidth import TokenBucket
from docket.torrent.ratelimit import HostRates
from docket.torrent.tracker import BdecodeError, bdecode

log = logging.getLogger(__name__)

MAX_PARALLEL = 4  # concurrent HTTP blob downloads per pull: the registry serves everyone else too
_PARALLEL = threading.BoundedSemaphore(MAX_PARALLEL)


def piece_hashes(torrent: bytes) -> list[bytes] | None:
    """The 20-byte SHA-1 of every piece (``info.pieces``), or None when the torrent has none we can use."""
    try:
        meta = bdecode(torrent)
        pieces = meta[b"info"][b"pieces"]
    except (BdecodeError, KeyError, TypeError):
        return None
    if not isinstance(pieces, bytes) or len(pieces) % 20:
        return None
    return [pieces[i:i + 20] for i in range(0, len(pieces), 20)]


def verified_bytes(path: Path, size: int, piece_length: int, hashes: list[bytes] | None, bitfield: bytes) -> int:
    """Bytes of the pieces ctorrent's saved ``bitfield`` marks as present that also match their hash on disk:
    what a resumed download really had (a poisoned piece is fetched again, so it is not "resumed")."""
    if not hashes or piece_length <= 0 or len(bitfield) != (len(hashes) + 7) // 8:
        return 0
    present = [i for i in range(len(hashes)) if bitfield[i // 8] & (0x80 >> (i % 8))]
    try:
        with open(path, "rb") as f:
            return sum(length for _, length, ok in _check_pieces(f, size, piece_length, hashes, present) if ok)
    except OSError:
        return 0


def _check_pieces(f: BinaryIO, size: int, piece_length: int, hashes: list[bytes],
                  indexes: Iterable[int]) -> Iterator[tuple[int, int, bool]]:
    """(start, length, matches its SHA-1) of each piece of ``indexes`` in the open file ``f``."""
    for i in indexes:
        start = i * piece_length
        length = min(piece_length, size - start)
        f.seek(start)
        data = f.read(length)
        ok = len(data) == length and hashlib.sha1(data).digest() == hashes[i]  # noqa: S324 - BitTorrent v1
        yield start, length, ok


@dataclass(frozen=True)
class ResumePlan:
    """What is already valid on disk and which byte ranges ``[start, end)`` must still be fetched."""

    size: int
    valid: int
    runs: tuple[tuple[int, int], ...]

    @property
    def missing(self) -> int:
        return sum(end - start for start, end in self.runs)


def plan_resume(path: Path, size: int, piece_length: int, hashes: list[bytes] | None) -> ResumePlan:
    """Check every piece on disk against its hash; coalesce the pieces that fail into runs to fetch.

    Without usable hashes nothing on disk can be trusted: the whole blob is fetched.
    """
    if size == 0:
        return ResumePlan(0, 0, ())
    pieces = -(-size // piece_length) if piece_length > 0 else 0
    if not hashes or len(hashes) != pieces or not path.exists():
        return ResumePlan(size, 0, ((0, size),))
    runs: list[tuple[int, int]] = []
    valid = 0
    with open(path, "rb") as f:
        for start, length, ok in _check_pieces(f, size, piece_length, hashes, range(pieces)):
            if ok:
                valid += length
            elif runs and runs[-1][1] == start:
                runs[-1] = (runs[-1][0], start + length)
            else:
                runs.append((start, start + length))
    return ResumePlan(size, valid, tuple(runs))


@dataclass
class HttpFetch:
    """One blob fetched over HTTP into ``path`` (in a thread); the polling loop reads ``progress``.

    ``before`` runs first in the thread (stopping the ctorrent that wrote the file: two writers must never
    share it). ``plan`` is known once the pieces on disk are checked.
    """

    api: RegistryClient
    digest: str
    size: int
    path: Path
    piece_length: int
    hashes: list[bytes] | None
    before: Callable[[], Any] | None = None
    rates: HostRates | None = None  # the process's download budget (a token bucket shared by its HTTP fetches)
    plan: ResumePlan | None = None
    received: int = 0  # bytes received over HTTP (kept, i.e. inside the requested ranges)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    @property
    def progress(self) -> int:
        """Bytes known good or received so far (for the progress bar)."""
        return (self.plan.valid if self.plan else 0) + self.received

    def start(self) -> HttpFetch:
        self.thread = threading.Thread(target=self.run, name=f"http-{self.digest[7:19]}", daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        try:
            if self.before is not None:
                self.before()
            with _PARALLEL:
                self.plan = plan_resume(self.path, self.size, self.piece_length, self.hashes)
                log.info("http fetch %s: %d bytes valid on disk, %d to fetch in %d range(s)", self.digest,
                         self.plan.valid, self.plan.missing, len(self.plan.runs))
                with self.rates.http() if self.rates else contextlib.nullcontext() as bucket:
                    self._fetch(self.plan, bucket)
        except BaseException as exc:  # noqa: BLE001 - handed to the polling thread
            self.error = exc
        finally:
            self.done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def _fetch(self, plan: ResumePlan, bucket: TokenBucket | None = None) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with os.fdopen(fd, "r+b") as f:
            for start, end in plan.runs:
                self._fetch_run(f, start, end, bucket)
            if os.fstat(f.fileno()).st_size != self.size:
                f.truncate(self.size)
            f.flush()
            os.fsync(f.fileno())

    def _fetch_run(self, f: Any, start: int, end: int, bucket: TokenBucket | None = None) -> None:
        """``[start, end)`` with one Range request, written in place, each piece checked as it completes."""
        pl = self.piece_length
        offset = start
        h = hashlib.sha1()  # noqa: S324 - BitTorrent v1 piece hashes
        f.seek(start)
        for chunk in self.api.iter_blob(self.digest, start, end):
            if self.cancel.is_set():
                raise errors.TransferError(f"download of {self.digest} over HTTP cancelled")
            f.write(chunk)
            if bucket is not None:
                bucket.take(len(chunk))
            if self.hashes is not None:
                view = memoryview(chunk)
                pos = offset
                while view:
                    piece_end = min((pos // pl + 1) * pl, self.size)
                    take = min(len(view), piece_end - pos)
                    h.update(view[:take])
                    view = view[take:]
                    pos += take
                    if pos == piece_end:
                        index = (pos - 1) // pl
                        if h.digest() != self.hashes[index]:
                            raise errors.IntegrityError(
                                f"digest check failed: piece {index} of {self.digest} received over HTTP from the "
                                f"registry at {self.api.url} does not match the torrent's hash",
                                "the bytes were altered in transit (a proxy?) or the registry's blob is corrupt; "
                                "nothing unverified is kept as valid, a retry fetches those pieces again")
                        h = hashlib.sha1()  # noqa: S324
            offset += len(chunk)
            self.received += len(chunk)
        if offset != end:
            raise errors.TransferError(
                f"the registry at {self.api.url} ended {self.digest} after {offset - start} of {end - start} bytes",
                "a retry resumes from the pieces already received")
