"""The registry's image record as the client checks it (it came from the network), and its config and torrents.

Every record docket pulls has format "layers" (docs/layers.md): a config blob plus ordered layer blobs. A layer
is identified by its diff_id (chain ids, "already in Docker", the config check) and fetched and verified by its
digest (the blob's bytes, maybe gzip-compressed, become its layer.tar: docker load decompresses it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from docket import errors, jsonstrict
from docket.client.digests import BLOB_DIGEST_RE, MAX_BLOB_SIZE, digest_algorithm
from docket.limits import MAX_LAYERS  # the registry's own limit, one number for both sides
from docket.reference import Reference
from docket.torrent.metainfo import TorrentMeta

MAX_CONFIG = 64 * 1024 * 1024
TORRENT_OVERHEAD = 64 * 1024  # a torrent is its piece hashes (20 bytes a piece) plus a few hundred bytes
_HEX40_LEN = 40
# an /v2 "artifact" whose type is an image config: an image docket cannot pull (e.g. non-distributable layers)
IMAGE_CONFIG_TYPES = frozenset({"application/vnd.docker.container.image.v1+json",
                                "application/vnd.oci.image.config.v1+json"})


def image_record(ref: Reference, data: dict[str, Any]) -> LayeredRecord:
    """The record of an image docket can pull, or an error saying why this one cannot be."""
    fmt = data.get("format")
    if fmt in ("index", "artifact"):
        kind = data.get("artifact_type") or data.get("media_type") or "unknown type"
        what = "a multi-platform image index" if fmt == "index" else \
            f"an OCI artifact ({kind})" if kind not in IMAGE_CONFIG_TYPES else \
            "an image whose layers are not all in the registry (non-distributable layers fetched from other " \
            "URLs) or not all listed by its config"
        raise errors.InvalidRequest(
            f"{ref} is {what} pushed through the registry's /v2 API; docket pulls single-platform images only",
            f"use a standard client: docker pull / skopeo copy / oras pull <registry host:port>/{ref}")
    if fmt != "layers":
        raise errors.InvalidRequest(
            f"the registry answered for {ref} with a record of format {fmt!r} (a whole image tarball as registries "
            "before layer-level distribution kept it); this docket pulls images as layers only",
            "upgrade the registry: at its next start it converts every whole-tarball image into layers")
    return LayeredRecord.from_json(ref, data)


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


def check_torrent_size(torrent: bytes, pieces: int, what: str) -> None:
    """A torrent much larger than its piece hashes need is padding a hostile registry made us hold in memory."""
    if len(torrent) > 20 * pieces + TORRENT_OVERHEAD:
        raise errors.IntegrityError(f"the torrent of {what} is {len(torrent)} bytes for {pieces} pieces; refused",
                                    "the registry is broken or hostile; nothing was downloaded")
