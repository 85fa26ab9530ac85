"""Torrent metainfo: build single-file torrents with torf and validate bytes that arrive from the network."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torf

from docket.errors import IntegrityError, InvalidRequest

log = logging.getLogger(__name__)

MAX_TORRENT_BYTES = 4 * 1024 * 1024  # ctorrent refuses bigger .torrent files
MIN_PIECE = 64 * 1024  # small pieces spread through a swarm sooner (benchmarks/README.md, tuning runs)
MAX_PIECE = 4 * 1024 * 1024  # ctorrent's limit
MAX_PIECES = 2048
CREATED_BY = "docket-registry"
_HEX40 = re.compile(r"\A[0-9a-f]{40}\Z")


@dataclass(frozen=True)
class TorrentMeta:
    info_hash: str  # 40 lowercase hex
    name: str
    length: int
    piece_length: int
    pieces: int
    announce: str


def choose_piece_size(length: int) -> int:
    """Smallest power of two >= 64 KiB giving <= 2048 pieces, capped at 4 MiB (ctorrent's limit)."""
    size = MIN_PIECE
    while size < MAX_PIECE and -(-length // size) > MAX_PIECES:
        size *= 2
    return size


def _meta(t: torf.Torrent) -> TorrentMeta:
    info = t.metainfo.get("info", {})
    return TorrentMeta(
        info_hash=str(t.infohash).lower(),
        name=str(t.name),
        length=int(info.get("length", t.size)),
        piece_length=int(t.piece_size),
        pieces=int(t.pieces),
        announce=str(t.metainfo.get("announce", "")),
    )


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory, fsync and rename (mode 0644)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".torrent", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def build_torrent(
    path: Path,
    announce_url: str,
    *,
    out: Path,
    piece_size: int | None = None,
    threads: int = 2,
    name: str | None = None,
    source: str | None = None,
) -> TorrentMeta:
    """Hash ``path`` into a single-file torrent at ``out`` (written atomically) and describe it.

    ``source`` goes into the info dict (torf's ``source`` field): a secret there makes the info hash something
    nobody can compute from the content alone (registries with read tokens, see README "Access control")."""
    path = Path(path)
    out = Path(out)
    if not path.is_file():
        raise InvalidRequest(f"cannot build a torrent: {path} is not a regular file")
    length = path.stat().st_size
    if length == 0:
        raise InvalidRequest(f"cannot build a torrent of an empty file: {path}",
                             hint="BitTorrent cannot describe zero-byte content")
    ps = piece_size or choose_piece_size(length)
    if ps & (ps - 1) or not (16 * 1024 <= ps <= MAX_PIECE):
        raise InvalidRequest(f"bad piece size {ps}", hint="use a power of two between 16 KiB and 4 MiB")
    t = torf.Torrent(path=path, trackers=[announce_url], private=False, created_by=CREATED_BY,
                     piece_size=ps, randomize_infohash=False)
    t.creation_date = None  # reproducible info hash and bytes for the same content
    if name:
        t.name = name
    if source:
        t.source = source
    t.generate(threads=threads)
    data = t.dump()
    write_atomic(out, data)
    meta = _meta(t)
    log.debug("built torrent %s for %s (%d pieces of %d)", meta.info_hash, path, meta.pieces, meta.piece_length)
    return meta


class PieceHasher:
    """SHA1 piece hashes of one file, fed in order while it is written (an upload streaming in), so that the
    .torrent needs no second read of the file. ``write_torrent`` gives byte for byte the torrent (and so the info
    hash) that ``build_torrent`` makes of the finished file with the same name and announce URL.

    The piece size depends on the final length (``choose_piece_size``). Give ``expected_length`` when it is known
    (Content-Length, a tar member's size); without it hashing starts at MIN_PIECE, right for every file up to
    MIN_PIECE * MAX_PIECES bytes. ``usable()`` says whether the fed bytes were hashed at the piece size their length
    calls for; when it is False (the length differed from the expectation, or an unknown length grew past that)
    the caller builds the torrent from the file as before. Hashing stops as soon as the piece size is known to be wrong,
    so a wrong guess costs no CPU beyond that point. Not thread-safe: one writer.
    """

    def __init__(self, expected_length: int | None = None, piece_size: int | None = None) -> None:
        if piece_size is not None and (piece_size & (piece_size - 1) or not 16 * 1024 <= piece_size <= MAX_PIECE):
            raise InvalidRequest(f"bad piece size {piece_size}", hint="use a power of two between 16 KiB and 4 MiB")
        self.fixed = piece_size is not None  # an explicit size is always usable
        self.expected_length = expected_length
        self.piece_size = piece_size or (choose_piece_size(expected_length) if expected_length else MIN_PIECE)
        self.length = 0
        self.abandoned = False
        self._digests = bytearray()
        self._sha = hashlib.sha1()
        self._fill = 0  # bytes of the current piece hashed so far

    def update(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not n:
            return
        self.length += n
        if self.abandoned:
            return
        if not self.fixed and self.length > MAX_PIECES * self.piece_size and self.piece_size < MAX_PIECE:
            self.abandoned = True  # the final length needs bigger pieces: stop hashing, the caller falls back
            self._digests = bytearray()
            return
        view = memoryview(data).cast("B")  # slices of it are not copies
        ps, off = self.piece_size, 0
        while off < n:
            take = min(ps - self._fill, n - off)
            self._sha.update(view[off:off + take])
            self._fill += take
            off += take
            if self._fill == ps:
                self._digests += self._sha.digest()
                self._sha = hashlib.sha1()
                self._fill = 0

    def usable(self, length: int | None = None) -> bool:
        """True when the hashes describe ``length`` bytes (default: what was fed) at the right piece size."""
        if self.abandoned or self.length == 0 or (length is not None and length != self.length):
            return False
        return self.fixed or self.piece_size == choose_piece_size(self.length)

    def pieces(self) -> bytes:
        """The concatenated 20-byte SHA1 digests of every piece (the last one short)."""
        if self.abandoned:
            raise InvalidRequest("piece hashing was abandoned: the length outgrew the piece size")
        tail = self._sha.copy().digest() if self._fill else b""
        return bytes(self._digests) + tail

    def torrent(self, announce_url: str, name: str, source: str | None = None) -> torf.Torrent:
        """The torf.Torrent that ``build_torrent`` would make (same keys, same values, no file needed)."""
        if not self.usable():
            raise InvalidRequest("cannot make a torrent from these piece hashes",
                                 hint="build it from the file with build_torrent")
        t = torf.Torrent(trackers=[announce_url], private=False, created_by=CREATED_BY, randomize_infohash=False)
        t.creation_date = None
        info = t.metainfo["info"]
        info["name"] = str(name)
        info["piece length"] = self.piece_size
        info["length"] = self.length
        info["pieces"] = self.pieces()
        if source:
            t.source = source
        return t

    def write_torrent(self, announce_url: str, *, out: Path, name: str, source: str | None = None) -> TorrentMeta:
        """Write the .torrent to ``out`` atomically and describe it, as ``build_torrent`` does."""
        t = self.torrent(announce_url, name, source)
        write_atomic(Path(out), t.dump())
        meta = _meta(t)
        log.debug("built torrent %s from streamed piece hashes (%d pieces of %d)", meta.info_hash, meta.pieces,
                  meta.piece_length)
        return meta


def torrent_source(path: Path) -> str | None:
    """The info dict's ``source`` of the .torrent at ``path`` (None when it has none)."""
    return torf.Torrent.read(path, validate=False).source


def retarget_torrent(path: Path, announce_url: str, source: str | None) -> TorrentMeta | None:
    """Rewrite the .torrent at ``path`` in place to announce to ``announce_url`` and carry ``source`` in its info
    dict (None: leave the source as it is). The pieces are kept, so no byte of the blob is read again; changing the
    source changes the info hash. Returns the new description, or None when nothing had to change."""
    t = torf.Torrent.read(path)
    changed = False
    if [list(tier) for tier in t.trackers] != [[announce_url]]:
        t.trackers = [announce_url]
        changed = True
    if source is not None and t.source != source:
        t.source = source
        changed = True
    if not changed:
        return None
    write_atomic(Path(path), t.dump())
    return _meta(t)


def read_torrent(data: bytes) -> TorrentMeta:
    """Parse and validate .torrent bytes from the network; only single-file torrents with an announce URL pass."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidRequest("torrent data must be bytes")
    if len(data) > MAX_TORRENT_BYTES:
        raise InvalidRequest(f"torrent file too large: {len(data)} bytes (limit {MAX_TORRENT_BYTES})")
    if not data:
        raise IntegrityError("empty torrent file")
    try:
        t = torf.Torrent.read_stream(bytes(data), validate=True)
    except torf.TorfError as exc:
        raise IntegrityError(f"invalid torrent file: {exc}",
                             hint="the .torrent was corrupted in transit or is not a torrent") from exc
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise IntegrityError(f"invalid torrent file: {exc!r}") from exc
    info = t.metainfo.get("info", {})
    if "files" in info or "length" not in info:
        raise IntegrityError("torrent must describe a single file")
    announce = t.metainfo.get("announce")
    if not isinstance(announce, str) or not announce:
        raise IntegrityError("torrent has no announce URL", hint="ctorrent requires an announce key")
    if not announce.isascii() or not announce.isprintable() or " " in announce:  # it reaches logs and terminals
        raise IntegrityError(f"torrent announce URL has control, space or non-ASCII characters: {announce[:100]!r}")
    try:
        meta = _meta(t)
    except (ValueError, TypeError, torf.TorfError) as exc:
        raise IntegrityError(f"invalid torrent file: {exc}") from exc
    if not _HEX40.match(meta.info_hash):
        raise IntegrityError("torrent info hash could not be computed")
    if meta.piece_length > MAX_PIECE:
        raise IntegrityError(f"piece length {meta.piece_length} exceeds ctorrent's 4 MiB limit")
    if meta.pieces != -(-meta.length // meta.piece_length):
        raise IntegrityError("torrent piece count does not match its length")
    return meta


def ipv4_address(value: str, what: str = "address") -> str:
    """``value`` if it is a dotted IPv4 address (ctorrent and opentracker speak no IPv6), else InvalidRequest."""
    try:
        ipaddress.IPv4Address(value)
    except ValueError:
        raise InvalidRequest(f"{what} {value!r} is not an IPv4 address", "give a dotted address such as 198.18.0.2") from None
    return value
