"""Whole ``docker save`` tarballs: split on the server into layer and config blobs, then committed as a docket push.

``PUT /api/v1/repositories/<name>/tags/<tag>`` (the original push) arrives here, and so, at start-up, does every
image record of format "tarball" made before layer-level distribution (``migrate``): after it every record has
layers, so clients need no whole-tarball pull path. The tarball blob of a migrated record becomes unreferenced
and GC reclaims it after the grace period.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from sqlalchemy import select

from docket.errors import InvalidImage
from docket.imagetar import ImageInfo, inspect_image_tar, iter_layers
from docket.registry.blobs import Blobs
from docket.registry.db import Database
from docket.registry.locks import Locks
from docket.registry.manifests import Manifests
from docket.registry.models import FORMAT_TARBALL, KIND_CONFIG, KIND_LAYER, Image
from docket.registry.store import BlobStore, Upload

log = logging.getLogger(__name__)


class TarballSplitter:
    def __init__(self, db: Database, store: BlobStore, locks: Locks, blobs: Blobs, manifests: Manifests, *,
                 chunk_size: int, location_lock: Callable[[], AbstractContextManager[object]]) -> None:
        """``location_lock``: the location's flock (FileBlobStore.locked), held while ``migrate`` writes blobs."""
        self.db = db
        self.store = store
        self.locks = locks
        self.blobs = blobs
        self.manifests = manifests
        self.chunk_size = chunk_size
        self.location_lock = location_lock

    def publish(self, tarball: Path, size: int, repository: str, tag: str, *, seed: bool = True) -> int:
        """Checked tar -> each layer copied out (hashed, must equal the config's diff_id at its position) -> layer
        blobs and config blob stored (and seeded) -> ``Manifests.docket_push``. Nothing is stored unless every
        layer matches; the caller deletes the tarball. Returns the tag's row id."""
        info: ImageInfo = inspect_image_tar(tarball)
        self.blobs.require_space(size)  # the layers are copied out of the tarball: about its size again
        diff_ids = info.diff_ids
        if len(diff_ids) != len(info.layers):
            raise InvalidImage(f"manifest.json lists {len(info.layers)} layer(s) but the image config's "
                               f"rootfs.diff_ids has {len(diff_ids)}", "the tarball was not written by `docker save`")
        with contextlib.ExitStack() as stack:
            parts: list[tuple[Upload, str]] = []
            copied: dict[str, str] = {}  # resolved member -> digest: a repeated (symlinked) layer is copied once
            for position, name, resolved, f, length in iter_layers(tarball, info):
                if resolved in copied:
                    digest = copied[resolved]
                else:
                    part = stack.enter_context(self.store.upload(pieces=True, expected_size=length))
                    while chunk := f.read(self.chunk_size):
                        part.write(chunk)
                    if part.size != length:
                        raise InvalidImage(f"layer {name!r} is truncated", "the tarball is corrupted")
                    digest = part.finish()
                    copied[resolved] = digest
                    parts.append((part, KIND_LAYER))
                if digest != diff_ids[position]:
                    raise InvalidImage(f"layer {position + 1} ({name!r}) has digest {digest}, but the image config "
                                       f"says {diff_ids[position]}", "the tarball is corrupted or was modified")
            config = stack.enter_context(self.store.upload())
            config.write(info.config_bytes)
            config.finish()
            parts.append((config, KIND_CONFIG))
            for part, kind in parts:  # two members with the same bytes: the second commit just drops its copy
                with self.locks.blob(part.digest):
                    self.blobs.store_locked(part, kind, seed=seed)
        image_id = self.manifests.docket_push(repository, tag, info.image_id, list(diff_ids), seed=seed)
        log.info("tarball %s:%s split into %d layer(s), image %s", repository, tag, len(diff_ids), info.image_id)
        return image_id

    def migrate(self) -> int:
        """Start-up: image records of format "tarball" become layer records (same tag, image and push time);
        their seeders start with the others. A record that cannot be split stays as it is (logged). The split
        writes blobs, so it runs under the location's lock: never beside a registry serving the location."""
        with self.db.session() as s:
            todo = list(s.execute(select(Image.repository, Image.tag, Image.blob_digest, Image.pushed_at)
                                  .where(Image.format == FORMAT_TARBALL).order_by(Image.id)))
        if not todo:
            return 0
        with self.location_lock():
            return self._convert(todo)

    def _convert(self, todo: list) -> int:
        done = 0
        for repository, tag, digest, pushed_at in todo:
            size = self.store.stat(digest) if digest else None
            if digest is None or size is None:
                log.error("tarball record %s:%s: blob %s is missing; not converted to layers", repository, tag, digest)
                continue
            try:
                image_id = self.publish(self.store.local_path(digest), size, repository, tag, seed=False)
            except Exception:  # noqa: BLE001 - one bad record must not stop the registry from starting
                log.exception("could not convert the tarball record %s:%s to layers", repository, tag)
                continue
            with self.locks.tags, self.db.session() as s:
                image = s.get(Image, image_id)
                if image is not None:
                    image.pushed_at = pushed_at  # converted, not pushed again
                    s.commit()
            done += 1
        if done:
            log.info("converted %d whole-tarball record(s) to layers; their tarball blobs are left to GC", done)
        return done
