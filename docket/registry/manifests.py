"""Manifests and tags: ``Manifests.commit`` is the one way a tag moves.

A manifest's bytes are a blob of kind "manifest", stored verbatim; a ``Manifest`` row per repository describes it,
with ``ManifestRef`` rows for its config, layers and (indexes) child manifests. Tags are rows of ``images``: a
tag becomes format "layers" when docket can pull its manifest (an image manifest whose image config lists one
diff_id per layer: the layers get torrents and seeders), else "index" or "artifact". Every push ends in
``commit``: a /v2 manifest PUT, a docket push of layers (``docket_push``: the registry writes a Docker schema 2
manifest, origin "docket") and a whole tarball split on the server (``tarball.py``, then ``docket_push``).

Locking (``locks.py``): blob locks (sorted, taken once) around everything that makes a blob referenced, the tag
lock around every transaction that changes tags or manifest rows (GC takes both).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from docket import jsonstrict
from docket.errors import (
    DeleteRefused, InvalidImage, InvalidJSON, ManifestBlobUnknown, ManifestUnknown, NotFound, WrongBlobKind,
)
from docket.imagetar import MAX_CONFIG_BYTES, config_diff_ids, parse_created
from docket.reference import ANY_DIGEST_RE
from docket.registry.blobs import Blobs
from docket.registry.db import Database
from docket.registry.locks import Locks
from docket.registry.models import (
    FORMAT_ARTIFACT, FORMAT_INDEX, FORMAT_LAYERS, FORMAT_TARBALL, KIND_LAYER, KIND_MANIFEST, KIND_TARBALL, Blob, Image,
    ImageLayer, Manifest, utcnow,
)
from docket.registry.oci import IMAGE_CONFIGS, ParsedManifest, docket_manifest, invalid_manifest, split_reference
from docket.registry.queries import (
    ORIGIN_DOCKET, find_image, find_manifest, image_digests, parent_indexes, unused_docket_manifests,
)
from docket.registry.rows import (
    close_tag, drop_docket_manifest_if_unused, drop_manifest_row, drop_tag, drop_untagged_manifests, open_tag,
    save_manifest_row,
)
from docket.registry.scrub import BlobScrubber
from docket.registry.store import BlobStore
from docket.registry.swarm import Swarm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageConfig:
    config: dict[str, Any]
    diff_ids: list[str]


class Manifests:
    def __init__(self, db: Database, store: BlobStore, locks: Locks, blobs: Blobs, swarm: Swarm,
                 scrubber: BlobScrubber) -> None:
        self.db = db
        self.store = store
        self.locks = locks
        self.blobs = blobs
        self.swarm = swarm
        self.scrubber = scrubber

    # -- the one commit -------------------------------------------------------------------------------------
    def commit(self, repository: str, tags: Sequence[str], manifest: ParsedManifest, origin: str, *,
               seed: bool = True) -> list[int]:
        """Store ``manifest`` in ``repository`` and point ``tags`` (none: a push by digest) at it: its blobs must
        be stored with the sizes it says (ManifestBlobUnknown, ManifestInvalid); an index's children must be in the
        repository. A tagged pullable image's layers become kind "layer" with torrents and seeders (``seed``
        False: start-up seeds them later) before the tags move, in one transaction. Returns the tags' row ids."""
        with self.db.session() as s:
            self._check_children(s, repository, manifest)
        with self.locks.all_blobs({manifest.digest, *(d.digest for d in manifest.blobs)}):
            seeds: list[tuple[str, str]] = []
            with self.db.session() as s:
                for desc in manifest.blobs:
                    blob = s.get(Blob, desc.digest)
                    if blob is None or self.store.stat(desc.digest) is None:
                        what = "config" if desc is manifest.config else "layer"
                        raise ManifestBlobUnknown(f"{what} blob {desc.digest} is not in this registry",
                                                  "push the blob before the manifest", detail={"digest": desc.digest},
                                                  what=what)
                    if blob.size != desc.size:
                        raise invalid_manifest(f"the manifest says blob {desc.digest} has {desc.size} bytes; it has "
                                       f"{blob.size}", digest=desc.digest)
                image_config = self._image_config(manifest) if tags else None
                if image_config is not None:
                    seeds = self._promote_layers_locked(s, [d.digest for d in manifest.layers])
            self._store_bytes_locked(manifest)
            if seed:
                for digest, info_hash in seeds:
                    self.swarm.seed(digest, info_hash)
                self.swarm.settle(seeds)
            with self.locks.tags, self.db.session() as s:
                self._check_children(s, repository, manifest)  # GC may have dropped one meanwhile
                save_manifest_row(s, repository, manifest, origin)
                images = [self._point_tag(s, repository, tag, manifest, image_config) for tag in tags]
                s.commit()
                ids = [image.id for image in images]
        log.info("push %s@%s (%s, %d bytes, origin %s)%s", repository, manifest.digest, manifest.media_type,
                 manifest.size, origin, f" tagged {', '.join(tags)}" if tags else "")
        return ids

    def _store_bytes_locked(self, manifest: ParsedManifest) -> None:
        """The manifest's bytes as a blob of kind "manifest" (caller holds its lock; the row comes with the tag)."""
        with self.store.upload(manifest.digest.partition(":")[0]) as up:
            up.write(manifest.raw)
            up.finish()
            self.blobs.store_locked(up, KIND_MANIFEST)

    def _check_children(self, s: Session, repository: str, parsed: ParsedManifest) -> None:
        for desc in parsed.manifests:
            child = find_manifest(s, repository, desc.digest)
            if child is None:
                raise ManifestBlobUnknown(f"the index lists manifest {desc.digest}, which is not in {repository}",
                                          "push every child manifest (by digest) to this repository before the "
                                          "index", detail={"digest": desc.digest}, what="manifest")
            if child.size != desc.size:  # sizes are summed into the tag's size: only true ones
                raise invalid_manifest(f"the index says manifest {desc.digest} has {desc.size} bytes; it has {child.size}",
                               digest=desc.digest)

    def _image_config(self, parsed: ParsedManifest) -> ImageConfig | None:
        """The image config when docket can pull this manifest: an image manifest whose config is an image config
        listing one diff_id per layer. Anything else is an artifact (never an error)."""
        config = parsed.config
        if parsed.is_index or config is None or config.media_type not in IMAGE_CONFIGS \
                or config.size > MAX_CONFIG_BYTES or parsed.has_foreign_layers:
            return None  # foreign layers: not in the store, so no torrents; docket pull refuses such a tag
        try:
            with self.store.open(config.digest) as f:
                body = jsonstrict.loads(f.read(), what="image config")
            diff_ids = body["rootfs"]["diff_ids"]
        except (OSError, InvalidJSON, KeyError, TypeError):
            return None
        if not isinstance(diff_ids, list) or len(diff_ids) != len(parsed.layers) \
                or not all(isinstance(d, str) and ANY_DIGEST_RE.fullmatch(d) for d in diff_ids):
            return None
        return ImageConfig(body, diff_ids)

    def _promote_layers_locked(self, s: Session, digests: list[str]) -> list[tuple[str, str]]:
        """Layers of a pullable image become kind "layer" with a torrent (caller holds their blob locks);
        returns (digest, info hash) to seed. A 0-byte blob stays as it is: a torrent cannot describe nothing."""
        changed = False
        seeds = []
        for digest in dict.fromkeys(digests):
            blob = s.get(Blob, digest)
            assert blob is not None
            if blob.size == 0:
                continue
            if blob.kind not in (KIND_LAYER, KIND_TARBALL):
                blob.kind = KIND_LAYER
                changed = True
            changed |= self.swarm.ensure_torrent(blob)
            assert blob.info_hash is not None
            seeds.append((digest, blob.info_hash))
        if changed:
            with self.locks.tags:
                s.commit()
        return seeds

    def _point_tag(self, s: Session, repository: str, tag: str, parsed: ParsedManifest,
                   image_config: ImageConfig | None) -> Image:
        image, old, old_manifest = open_tag(s, repository, tag)
        image.blob_digest = None
        image.manifest_digest = parsed.digest
        image.pushed_at = utcnow()
        if image_config is not None:
            assert parsed.config is not None
            image.format = FORMAT_LAYERS
            image.config_digest = image.image_id = parsed.config.digest
            image.created = parse_created(image_config.config.get("created"))
            image.size = sum(d.size for d in parsed.blobs)
            image.layers.extend(
                ImageLayer(position=i, blob_digest=d.digest, media_type=d.media_type,
                           diff_id=None if image_config.diff_ids[i] == d.digest else image_config.diff_ids[i])
                for i, d in enumerate(parsed.layers))
        else:
            image.format = FORMAT_INDEX if parsed.is_index else FORMAT_ARTIFACT
            image.config_digest = None
            image.image_id = parsed.digest
            image.created = parse_created((parsed.annotations or {}).get("org.opencontainers.image.created"))
            image.size = parsed.size + sum(d.size for d in (*parsed.blobs, *parsed.manifests))
        close_tag(s, image, old, old_manifest)
        return image

    # -- docket pushes --------------------------------------------------------------------------------------
    def docket_push(self, repository: str, tag: str, config_digest: str, layers: list[str], *,
                    seed: bool = True) -> int:
        """A docket push of blobs already stored (the config, then the layers base first): checked (present,
        the config's rootfs.diff_ids are the layers, each uploaded as a layer), then committed with the Docker
        schema 2 manifest the registry writes for it. Returns the tag's row id."""
        manifest, kinds = self._docket_manifest(config_digest, layers)
        assert manifest.config is not None
        if manifest.config.size > MAX_CONFIG_BYTES:
            raise InvalidImage(f"config blob {config_digest} is {manifest.config.size} bytes; the limit is "
                               f"{MAX_CONFIG_BYTES}")
        with self.store.open(config_digest) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        hint = "the config blob must be the image config (its digest is the image id)"
        try:
            diff_ids = list(config_diff_ids(raw))
        except InvalidImage as exc:
            raise InvalidImage(f"config blob {config_digest}: {exc.message}", hint) from exc
        if diff_ids != list(layers):
            raise InvalidImage(f"the layers {layers} do not match the config's rootfs.diff_ids {diff_ids}",
                               "list the layers in the order of the image config's rootfs.diff_ids")
        for digest in dict.fromkeys(layers):
            if kinds[digest] != KIND_LAYER:
                raise WrongBlobKind(f"blob {digest} was uploaded as kind {kinds[digest]!r}, not as a layer",
                                    detail={"digest": digest})
        return self.commit(repository, [tag], manifest, ORIGIN_DOCKET, seed=seed)[0]

    def _docket_manifest(self, config_digest: str, layers: list[str]) -> tuple[ParsedManifest, dict[str, str]]:
        """The Docker schema 2 manifest the registry writes for a docket push of these blobs, and each blob's
        kind; ManifestBlobUnknown names the first one missing."""
        found = {}
        with self.db.session() as s:
            for digest in [config_digest, *layers]:
                blob = s.get(Blob, digest)
                if blob is None or self.store.stat(digest) is None:
                    what = "config" if digest == config_digest else "layer"
                    raise ManifestBlobUnknown(f"{what} blob {digest} is not in this registry",
                                              "push the blob before the manifest", detail={"digest": digest},
                                              what=what)
                found[digest] = (blob.size, blob.kind)
        manifest = docket_manifest((config_digest, found[config_digest][0]), [(d, found[d][0]) for d in layers])
        return manifest, {digest: kind for digest, (_, kind) in found.items()}

    def backfill(self) -> int:
        """Start-up: every format "layers" tag without a V2 manifest (pushed before 0003) gets one."""
        with self.db.session() as s:
            todo = [(i.id, i.repository, i.tag) for i in s.scalars(select(Image).where(Image.format == FORMAT_LAYERS))
                    if i.manifest is None]
        done = 0
        for image_id, repository, tag in todo:
            try:
                done += self.backfill_image(image_id)
            except Exception:  # noqa: BLE001 - one bad row must not stop the registry from starting
                log.exception("could not write the V2 manifest of %s:%s", repository, tag)
        if done:
            log.info("wrote V2 manifests for %d tag(s) pushed before the V2 API", done)
        return done

    def backfill_image(self, image_id: int) -> bool:
        with self.db.session() as s:
            image = s.get(Image, image_id)
            if image is None or image.format != FORMAT_LAYERS or image.config_digest is None:
                return False
            config, layers = image.config_digest, [layer.blob_digest for layer in image.layers]
        try:
            parsed, _ = self._docket_manifest(config, layers)
        except ManifestBlobUnknown:
            return False
        with self.locks.blob(parsed.digest):
            self._store_bytes_locked(parsed)
            with self.locks.tags, self.db.session() as s:
                image = s.get(Image, image_id)
                if image is None or image.config_digest != config \
                        or [layer.blob_digest for layer in image.layers] != layers:
                    return False  # re-pushed meanwhile: that push wrote its own
                save_manifest_row(s, image.repository, parsed, ORIGIN_DOCKET)
                image.manifest_digest = parsed.digest
                s.commit()
        return True

    # -- reads ----------------------------------------------------------------------------------------------
    def resolve(self, s: Session, repository: str, reference: str) -> Manifest:
        tag, digest = split_reference(reference)
        if tag is not None:
            image = find_image(s, repository, tag)
            if image is None:
                raise ManifestUnknown(f"no tag {tag!r} in repository {repository}", detail={"tag": tag})
            if image.format == FORMAT_TARBALL:
                raise ManifestUnknown(f"{repository}:{tag} was pushed as a whole tarball by an old docket; it has "
                                      "no V2 manifest", "push it again (docket push or docker push)",
                                      detail={"tag": tag})
            if image.manifest is None and image.format == FORMAT_LAYERS:
                s.rollback()
                self.backfill_image(image.id)  # pushed before 0003 and not backfilled yet
                s.expire_all()
                image = find_image(s, repository, tag)
                assert image is not None
            digest = image.manifest_digest
        assert digest is not None
        row = find_manifest(s, repository, digest)
        if row is None:
            raise ManifestUnknown(f"no manifest {digest} in repository {repository}", detail={"digest": digest})
        return row

    def read(self, s: Session, repository: str, reference: str) -> tuple[bytes, Manifest]:
        row = self.resolve(s, repository, reference)
        self.scrubber.check_servable(row.digest)
        try:
            with self.store.open(row.digest) as f:
                return f.read(), row
        except FileNotFoundError as exc:
            raise ManifestUnknown(f"manifest {row.digest} is missing from the store",
                                  "push it again", detail={"digest": row.digest}) from exc

    # -- deletes --------------------------------------------------------------------------------------------
    def delete_tag(self, repository: str, tag: str, *, expect: tuple[str | None, datetime] | None = None,
                   prune: bool = False) -> bool:
        """The tag goes; a manifest docket wrote for it goes too unless another tag or an index uses it (a V2
        manifest stays until DELETE /v2/<name>/manifests/<digest>, unless ``prune``: then any manifest left
        untagged and unlisted goes, with the index children it alone kept); blobs nothing uses become
        unreferenced. ``expect`` (manifest digest, pushed_at): delete only a tag still as it was then, else
        False (retention: a push racing it is never undone)."""
        with self.locks.tags, self.db.session() as s:
            image = find_image(s, repository, tag)
            if image is None:
                raise NotFound(f"no image {repository}:{tag} in this registry",
                               "list the tags with `docket images` (GET /api/v1/images)")
            if expect is not None and (image.manifest_digest, image.pushed_at) != expect:
                return False
            digests = image_digests(image)
            manifest = drop_tag(s, image)
            if prune:
                drop_untagged_manifests(s, repository, manifest)
            else:
                drop_docket_manifest_if_unused(s, repository, manifest)
            s.commit()
        log.info("deleted tag %s:%s (blobs %s kept until GC)", repository, tag, ", ".join(sorted(digests)))
        return True

    def delete(self, repository: str, reference: str) -> None:
        """By digest: the manifest and every tag of it in this repository (refused while an index of the
        repository lists it). By tag: only the tag."""
        tag, digest = split_reference(reference)
        if tag is not None:
            try:
                self.delete_tag(repository, tag)
            except NotFound as exc:
                raise ManifestUnknown(f"no tag {tag!r} in repository {repository}", detail={"tag": tag}) from exc
            return
        assert digest is not None
        with self.locks.tags, self.db.session() as s:
            row = find_manifest(s, repository, digest)
            if row is None:
                raise ManifestUnknown(f"no manifest {digest} in repository {repository}", detail={"digest": digest})
            parents = parent_indexes(s, repository, digest)
            if parents:
                raise DeleteRefused(f"manifest {digest} is listed by the index {parents[0]} in {repository}",
                                    "delete the index first", detail={"digest": digest, "indexes": parents})
            images = s.scalars(select(Image).where(Image.repository == repository,
                                                   Image.manifest_digest == digest)).all()
            for image in images:
                drop_tag(s, image)
            drop_manifest_row(s, row)
            s.commit()
        log.info("deleted manifest %s@%s and its %d tag(s)", repository, digest, len(images))

    def collect(self) -> int:
        """GC: drop manifests docket wrote whose tags are gone (their bytes and blobs become unreferenced)."""
        dropped = 0
        while True:  # dropping an index can free the manifests it listed
            with self.locks.tags, self.db.session() as s:
                rows = unused_docket_manifests(s)
                for row in rows:
                    drop_manifest_row(s, row)
                s.commit()
            dropped += len(rows)
            if not rows:
                return dropped
