"""Layer-level helpers shared by push and pull (docs/layers.md): chain ids, ``docker save`` member
classification, a file-like view of a chunk iterator, and the streamed legacy ``docker load`` tarball.

Nothing here touches the network or a daemon; push.py and pull.py do.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile's RECORDSIZE: writers pad the archive to a multiple of it
CHUNK = 1024 * 1024


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """chain_id(1) = diff_id(1); chain_id(n) = "sha256:" + sha256(chain_id(n-1) + " " + diff_id(n))."""
    out: list[str] = []
    for diff_id in diff_ids:
        if not out:
            out.append(diff_id)
        else:
            out.append("sha256:" + hashlib.sha256(f"{out[-1]} {diff_id}".encode()).hexdigest())
    return out


def present_prefix(diff_ids: Sequence[str], local_chain_ids: set[str]) -> int:
    """How many leading layers the daemon already has: layer n is present when chain_id(n) is."""
    n = 0
    for i, cid in enumerate(chain_ids(diff_ids), 1):
        if cid in local_chain_ids:
            n = i
    return n


# -- docker save members -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemberKind:
    kind: str  # "layer" | "config" | "other"
    digest: str | None = None  # known from the name (OCI blobs/sha256/<hex>, the config); None for legacy layers


_OCI_META = {"index.json", "oci-layout", "manifest.json", "repositories"}


def classify_member(info: tarfile.TarInfo, config_digest: str, diff_ids: Iterable[str]) -> MemberKind:
    """What a ``docker save`` member is, from its name alone (we see it before manifest.json in a stream).

    Legacy (Engine 20.10): ``<v1id>/layer.tar`` are layers (names are not digests), ``<confighex>.json`` is
    the config. OCI (Engine 25+): ``blobs/sha256/<hex>``, a layer when ``sha256:<hex>`` is a diff_id
    (uncompressed layers are named by their diff_id), the config when it is the image id, else
    manifests/indexes. Links (duplicate layers) and directories are "other".
    """
    if not info.isfile():
        return MemberKind("other")
    name = posixpath.normpath(info.name.lstrip("./")) if info.name not in (".", "./") else ""
    config_hex = config_digest.split(":", 1)[1]
    if name in _OCI_META:
        return MemberKind("other")
    if name.startswith("blobs/sha256/"):
        digest = "sha256:" + name.rsplit("/", 1)[1]
        if digest == config_digest:
            return MemberKind("config", digest)
        if digest in set(diff_ids):
            return MemberKind("layer", digest)
        return MemberKind("other")
    if name == f"{config_hex}.json":
        return MemberKind("config", config_digest)
    if posixpath.basename(name) == "layer.tar" and name.count("/") == 1:
        return MemberKind("layer")
    return MemberKind("other")


class IterReader(io.RawIOBase):
    """A read-only file over an iterator of byte chunks, counting what was read (progress over the export)."""

    def __init__(self, chunks: Iterable[bytes], on_read: Callable[[int], None] | None = None) -> None:
        self._it = iter(chunks)
        self._buf = b""
        self.count = 0
        self._on_read = on_read

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
        while not self._buf:
            try:
                self._buf = next(self._it)
            except StopIteration:
                return 0
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        self.count += n
        if self._on_read:
            self._on_read(self.count)
        return n


def open_stream(chunks: Iterable[bytes], on_read: Callable[[int], None] | None = None) -> tarfile.TarFile:
    """``tarfile`` in stream mode (``r|``: forward only, no seeks) over the export chunks."""
    raw = IterReader(chunks, on_read)
    return tarfile.open(fileobj=io.BufferedReader(raw, CHUNK), mode="r|")


def member_chunks(tar: tarfile.TarFile, info: tarfile.TarInfo, chunk: int = CHUNK) -> Iterator[bytes]:
    """The data of the current stream member, in chunks (never whole in memory)."""
    f = tar.extractfile(info)
    if f is None:
        return
    while True:
        data = f.read(chunk)
        if not data:
            return
        yield data


# -- the load tarball, generated ------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoadEntry:
    name: str
    size: int
    data: bytes | None = None  # small members (manifest.json, config)
    path: Path | None = None  # big ones (layer blobs), read in chunks when the stream reaches them
    is_dir: bool = False


def _header(entry: LoadEntry) -> bytes:
    info = tarfile.TarInfo(entry.name)
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    if entry.is_dir:
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.size = 0
    else:
        info.mode = 0o644
        info.size = entry.size
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def load_entries(ref: str, config_digest: str, config: bytes, diff_ids: Sequence[str],
                 blobs: dict[str, Path]) -> list[LoadEntry]:
    """Members of a legacy ``docker load`` tarball: manifest.json lists every layer; files only for ``blobs``.

    docker load skips layers whose chain id it already has without opening their files, so the missing
    ones need not be in the archive.
    """
    config_hex = config_digest.split(":", 1)[1]
    manifest = [{"Config": f"{config_hex}.json", "RepoTags": [ref],
                 "Layers": [f"{d.split(':', 1)[1]}/layer.tar" for d in diff_ids]}]
    entries = [LoadEntry(f"{config_hex}.json", len(config), data=config)]
    seen: set[str] = set()
    for d in diff_ids:
        if d in blobs and d not in seen:
            seen.add(d)
            hexd = d.split(":", 1)[1]
            path = blobs[d]
            entries.append(LoadEntry(f"{hexd}/", 0, is_dir=True))
            entries.append(LoadEntry(f"{hexd}/layer.tar", path.stat().st_size, path=path))
    body = json.dumps(manifest).encode()
    entries.append(LoadEntry("manifest.json", len(body), data=body))
    return entries


def _padding(size: int) -> bytes:
    return b"\0" * ((BLOCK - size % BLOCK) % BLOCK)


def stream_length(entries: Sequence[LoadEntry]) -> int:
    """Exact byte length of ``tar_stream(entries)`` (for a Content-Length, when one is wanted)."""
    n = 0
    for e in entries:
        n += len(_header(e)) + e.size + len(_padding(e.size))
    n += 2 * BLOCK
    return n + (RECORD - n % RECORD) % RECORD


def tar_stream(entries: Sequence[LoadEntry], chunk: int = CHUNK) -> Iterator[bytes]:
    """The tarball as chunks: header blocks, file data read in ``chunk``s, padding, end blocks.

    A layer file that changes size while being streamed is an error (the archive would be corrupt).
    """
    total = 0
    for e in entries:
        head = _header(e)
        total += len(head)
        yield head
        if e.is_dir:
            continue
        if e.data is not None:
            yield e.data
        else:
            assert e.path is not None
            left = e.size
            with open(e.path, "rb") as f:
                while left > 0:
                    data = f.read(min(chunk, left))
                    if not data:
                        raise OSError(f"{e.path} shrank while being streamed")
                    left -= len(data)
                    yield data
        pad = _padding(e.size)
        total += e.size + len(pad)
        if pad:
            yield pad
    total += 2 * BLOCK
    yield b"\0" * (2 * BLOCK + (RECORD - total % RECORD) % RECORD)
