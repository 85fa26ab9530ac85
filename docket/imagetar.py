"""Check a ``docker save`` tarball and read its identity, without extracting anything.

Both layouts written by ``docker save`` carry ``manifest.json``: Engine 20.10 (``<id>/layer.tar``,
``<hex>.json`` config) and Engine 25+ (OCI layout, ``blobs/sha256/<hex>`` for config and layers, plus
``index.json``). Reading ``manifest.json`` supports both. The archive is opened with random access and only
headers, ``manifest.json`` and the config are read, so checking a 20 GiB tarball costs a few seeks.

Rejected: anything not an uncompressed tar, member names that are absolute or contain ``..``, symlinks or
hard links that point outside the archive, device files and FIFOs, a manifest.json that does not describe
exactly one image, referenced members that are missing, and a config whose content does not match the
digest its name promises.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from docket import jsonstrict
from docket.errors import InvalidImage, InvalidJSON
from docket.limits import MAX_LAYERS

MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_CONFIG_BYTES = 64 * 1024 * 1024
MAX_LINK_DEPTH = 16
_HEX64 = re.compile(r"[a-f0-9]{64}")
_DIGEST = re.compile(r"\Asha256:[a-f0-9]{64}\Z")
_RFC3339 = re.compile(
    r"\A(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:\d{2})?\Z"
)


@dataclass(frozen=True)
class ImageInfo:
    image_id: str  # "sha256:" + sha256(config bytes)
    created: datetime | None  # from the config, UTC
    config: str  # member name of the config
    layers: tuple[str, ...]
    repo_tags: tuple[str, ...]
    layout: str  # "oci" (Engine 25+, index.json present) or "docker" (legacy)
    members: int = field(default=0)
    config_bytes: bytes = field(default=b"", repr=False, compare=False)  # the config exactly as stored

    @property
    def diff_ids(self) -> tuple[str, ...]:
        """The config's ``rootfs.diff_ids``: the digest each layer (by position) must have."""
        return config_diff_ids(self.config_bytes)


def config_diff_ids(config_bytes: bytes) -> tuple[str, ...]:
    """``rootfs.diff_ids`` of an image config (raises InvalidImage when absent or malformed)."""
    config = _strict_json(config_bytes, "image config")
    rootfs = config.get("rootfs") if isinstance(config, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(isinstance(d, str) and _DIGEST.fullmatch(d) for d in diff_ids):
        raise _bad("image config has no valid rootfs.diff_ids list")
    return tuple(diff_ids)


def _strict_json(raw: bytes, what: str) -> Any:
    """The strict parser (docket/jsonstrict.py) for a document inside a pushed tarball: InvalidImage when refused."""
    try:
        return jsonstrict.loads(raw, what=what)
    except InvalidJSON as exc:
        raise _bad(exc.message) from exc


def _bad(message: str, hint: str | None = None) -> InvalidImage:
    return InvalidImage(message, hint or "upload the unmodified output of `docker save` for one image")


def _normalize(name: str) -> str:
    """Member name as a clean relative path; raises on absolute names and ``..`` components."""
    if not name or "\x00" in name:
        raise _bad(f"tar member with an empty or invalid name: {name!r}")
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name):
        raise _bad(f"tar member has an absolute path: {name!r}", "an image tarball only holds relative paths")
    parts = [p for p in name.replace("\\", "/").split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise _bad(f"tar member escapes the archive with '..': {name!r}")
    return "/".join(parts)


def _link_target(member_dir: str, linkname: str) -> str:
    """Where a symlink points, relative to the archive root; raises when it leaves the archive."""
    if not linkname or linkname.startswith("/"):
        raise _bad(f"symlink to an absolute path: {linkname!r}")
    joined = posixpath.normpath(posixpath.join(member_dir, linkname))
    if joined == ".." or joined.startswith("../") or joined.startswith("/"):
        raise _bad(f"symlink escapes the archive: {linkname!r}")
    return "" if joined == "." else joined


def _check_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    members: dict[str, tarfile.TarInfo] = {}
    for info in tar:  # streams through headers; data is skipped by seeking
        name = _normalize(info.name)
        if info.ischr() or info.isblk() or info.isfifo() or info.isdev():
            raise _bad(f"tar member is a device file or FIFO: {info.name!r}")
        if info.issym():
            _link_target(posixpath.dirname(name), info.linkname)
        elif info.islnk():
            _normalize(info.linkname)  # hard links name another member of the archive
        elif not (info.isfile() or info.isdir()):
            raise _bad(f"tar member of unsupported type {info.type!r}: {info.name!r}")
        members[name] = info
    return members


def _resolve(members: dict[str, tarfile.TarInfo], name: str) -> tarfile.TarInfo:
    """The regular file a manifest reference ends at, following in-archive links."""
    current = _normalize(name)
    for _ in range(MAX_LINK_DEPTH):
        info = members.get(current)
        if info is None:
            raise _bad(f"manifest.json refers to {name!r}, which is not in the archive",
                       "the tarball is truncated or was not written by `docker save`")
        if info.isfile():
            return info
        if info.issym():
            current = _link_target(posixpath.dirname(current), info.linkname)
        elif info.islnk():
            current = _normalize(info.linkname)
        else:
            raise _bad(f"manifest.json refers to {name!r}, which is not a regular file")
    raise _bad(f"too many links while resolving {name!r}")


def _read_member(tar: tarfile.TarFile, info: tarfile.TarInfo, limit: int, what: str) -> bytes:
    if info.size > limit:
        raise _bad(f"{what} is {info.size} bytes; the limit is {limit}")
    f = tar.extractfile(info)
    if f is None:
        raise _bad(f"{what} cannot be read")
    data = f.read()
    if len(data) != info.size:
        raise _bad(f"{what} is truncated")
    return data


def parse_created(value: object) -> datetime | None:
    """Docker's RFC 3339 ``created`` (nanoseconds allowed) as an aware UTC datetime; None when absent/invalid."""
    if not isinstance(value, str):
        return None
    m = _RFC3339.match(value.strip())
    if not m:
        return None
    y, mo, d, h, mi, s, frac, zone = m.groups()
    micro = int((frac or "0")[:6].ljust(6, "0"))
    try:
        dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), micro, tzinfo=UTC)
    except ValueError:
        return None
    if zone and zone not in ("Z", "z"):
        sign = 1 if zone[0] == "+" else -1
        dt -= sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    return dt


def inspect_image_tar(path: Path) -> ImageInfo:
    """Validate the tarball at ``path`` and describe the one image in it (raises InvalidImage)."""
    try:
        tar = tarfile.open(path, mode="r:")
    except (tarfile.TarError, EOFError) as exc:
        raise _bad(f"not a tar archive: {exc}", "upload the uncompressed output of `docker save`") from exc
    with tar:
        try:
            members = _check_members(tar)
            if "manifest.json" not in members:
                raise _bad("the archive has no manifest.json",
                           "upload the output of `docker save` (Docker 1.10 or newer)")
            manifest_info = _resolve(members, "manifest.json")
            raw = _read_member(tar, manifest_info, MAX_MANIFEST_BYTES, "manifest.json")
            manifest = _strict_json(raw, "manifest.json")
            if not isinstance(manifest, list) or len(manifest) != 1 or not isinstance(manifest[0], dict):
                raise _bad("manifest.json must list exactly one image",
                           "push one image per tag: `docker save` a single repository:tag")
            entry = manifest[0]
            config_name = entry.get("Config")
            layers = entry.get("Layers")
            repo_tags = entry.get("RepoTags")
            if "RepoTags" not in entry or not (repo_tags is None or isinstance(repo_tags, list)):
                raise _bad("manifest.json entry has no RepoTags list")
            if not isinstance(config_name, str) or not config_name:
                raise _bad("manifest.json entry has no Config")
            if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
                raise _bad("manifest.json entry has no Layers list")
            if repo_tags is not None and not all(isinstance(x, str) for x in repo_tags):
                raise _bad("manifest.json RepoTags must be strings")
            if len(layers) > MAX_LAYERS:  # the limit of both registry APIs (docket/limits.py), before any copying
                raise _bad(f"manifest.json lists {len(layers)} layers; the limit is {MAX_LAYERS}",
                           "docker itself stops at 127 layers")
            for layer in layers:
                _resolve(members, layer)
            config_bytes = _read_member(tar, _resolve(members, config_name), MAX_CONFIG_BYTES, "image config")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise _bad(f"the tar archive is damaged: {exc}") from exc
    config_hex = hashlib.sha256(config_bytes).hexdigest()
    # the config's name embeds its digest in both layouts: check it (integrity, not just shape)
    named = _HEX64.search(posixpath.basename(_normalize(config_name)))
    if named and named.group(0) != config_hex:
        raise _bad(f"image config {config_name!r} does not match its digest (got sha256:{config_hex})",
                   "the tarball is corrupted")
    config = _strict_json(config_bytes, "image config")
    if not isinstance(config, dict):
        raise _bad("image config is not a JSON object")
    return ImageInfo(
        image_id=f"sha256:{config_hex}",
        created=parse_created(config.get("created")),
        config=_normalize(config_name),
        layers=tuple(_normalize(x) for x in layers),
        repo_tags=tuple(repo_tags or ()),
        layout="oci" if "index.json" in members else "docker",
        members=len(members),
        config_bytes=config_bytes,
    )


def iter_layers(path: Path, info: ImageInfo) -> Iterator[tuple[int, str, str, tarfile.ExFileObject, int]]:
    """``(position, member name, resolved member name, readable file, size)`` for each layer of a tarball
    ``inspect_image_tar`` accepted, in manifest order. Links (legacy ``docker save`` writes a repeated layer as a
    symlink to the first copy) are followed to the regular member holding the bytes (the resolved name)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = {_normalize(m.name): m for m in tar.getmembers()}
            for position, name in enumerate(info.layers):
                member = _resolve(members, name)
                f = tar.extractfile(member)
                if f is None:
                    raise _bad(f"layer {name!r} cannot be read")
                yield position, name, _normalize(member.name), f, member.size
    except (tarfile.TarError, EOFError) as exc:
        raise _bad(f"the tar archive is damaged: {exc}") from exc
