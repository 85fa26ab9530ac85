"""Metadata tables: content-addressed blobs and the tags (images) that point at them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint, func, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Stored as naive UTC (SQLite keeps no zone), always handed back timezone-aware."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


DIGEST_LEN = 135  # "sha512:" + 128 hex


class Base(DeclarativeBase):
    pass


# blob kinds (docs/layers.md): which ones get a .torrent, a whitelist entry and a seeder
# "blob": pushed through the V2 API and not (yet) used as a layer; "manifest": a V2 manifest's bytes (docs/v2.md)
KIND_LAYER, KIND_CONFIG, KIND_TARBALL, KIND_BLOB, KIND_MANIFEST = "layer", "config", "tarball", "blob", "manifest"
SEEDED_KINDS = frozenset({KIND_LAYER, KIND_TARBALL})
# a tag's format: docket can pull "layers" and "tarball"; "index" and "artifact" are V2-only (docker, oras...)
FORMAT_LAYERS, FORMAT_TARBALL, FORMAT_INDEX, FORMAT_ARTIFACT = "layers", "tarball", "index", "artifact"


class Blob(Base):
    """Immutable bytes named by digest, with the torrent that describes them (config blobs have none)."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(DIGEST_LEN), primary_key=True)  # "sha256:<64 hex>" or sha512
    size: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16), default=KIND_TARBALL, server_default=KIND_TARBALL)
    info_hash: Mapped[str | None] = mapped_column(String(40), unique=True, nullable=True)
    piece_length: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # set when the last tag pointing here went away; GC deletes after the grace period
    unreferenced_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, default=None)

    images: Mapped[list[Image]] = relationship(back_populates="blob", foreign_keys="Image.blob_digest")

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]

    @property
    def seeded(self) -> bool:
        """Whether this kind of blob is served over BitTorrent (torrent, whitelist, seeder)."""
        return self.kind in SEEDED_KINDS


class Image(Base):
    """A tag: ``repository:tag`` -> a config blob plus ordered layer blobs (format "layers"), or, for tags pushed
    before layer-level distribution, one whole ``docker save`` tarball blob (format "tarball"), or a V2 manifest
    docket cannot pull (format "index": an image index / manifest list; "artifact": any other manifest)."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("repository", "tag", name="uq_images_repository_tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    repository: Mapped[str] = mapped_column(String(255))
    tag: Mapped[str] = mapped_column(String(128))
    image_id: Mapped[str] = mapped_column(String(DIGEST_LEN))
    created: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16), default=FORMAT_TARBALL, server_default=FORMAT_TARBALL)
    blob_digest: Mapped[str | None] = mapped_column(ForeignKey("blobs.digest"), index=True, nullable=True)
    config_digest: Mapped[str | None] = mapped_column(ForeignKey("blobs.digest"), index=True, nullable=True)
    manifest_digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN), nullable=True)
    pushed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    blob: Mapped[Blob | None] = relationship(back_populates="images", foreign_keys=[blob_digest])
    config: Mapped[Blob | None] = relationship(foreign_keys=[config_digest])
    layers: Mapped[list[ImageLayer]] = relationship(back_populates="image", order_by="ImageLayer.position",
                                                    cascade="all, delete-orphan", passive_deletes=True)
    # the V2 manifest row the tag points at (same repository, digest manifest_digest); None for "tarball" tags and
    # for "layers" tags pushed before 0003 until the start-up backfill wrote theirs
    manifest: Mapped[Manifest | None] = relationship(
        primaryjoin="and_(foreign(Image.repository) == Manifest.repository, "
                    "foreign(Image.manifest_digest) == Manifest.digest)",
        viewonly=True, uselist=False)

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


class ImageLayer(Base):
    """Position ``position`` (0 = base) of an image's layer list -> a layer blob. Layers pushed by docket are
    uncompressed (blob digest = diff_id, ``diff_id`` None); layers pushed by ``docker push`` are usually gzip, with
    the diff_id from the image config."""

    __tablename__ = "image_layers"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), index=True)
    diff_id: Mapped[str | None] = mapped_column(String(DIGEST_LEN), nullable=True, default=None)
    media_type: Mapped[str | None] = mapped_column(String(255), nullable=True, default=None)

    image: Mapped[Image] = relationship(back_populates="layers")
    blob: Mapped[Blob] = relationship()


class Manifest(Base):
    """A V2/OCI manifest or index stored in a repository (its bytes are a blob of kind "manifest"). Tags point
    at manifests through ``Image.manifest_digest``. ``origin`` "docket": made by the registry for a docket push
    (GC may drop it once untagged); "v2": pushed by a client, kept until deleted, as the spec expects."""

    __tablename__ = "manifests"
    __table_args__ = (UniqueConstraint("repository", "digest", name="uq_manifests_repository_digest"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    repository: Mapped[str] = mapped_column(String(255), index=True)
    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), index=True)
    media_type: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger)
    artifact_type: Mapped[str | None] = mapped_column(String(255), nullable=True, default=None)
    subject_digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN), index=True, nullable=True, default=None)
    config_digest: Mapped[str | None] = mapped_column(String(DIGEST_LEN), nullable=True, default=None)
    annotations: Mapped[str | None] = mapped_column(String, nullable=True, default=None)  # JSON, for referrers
    origin: Mapped[str] = mapped_column(String(16), default="v2", server_default="v2")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    refs: Mapped[list[ManifestRef]] = relationship(back_populates="manifest", order_by="ManifestRef.position",
                                                   cascade="all, delete-orphan", passive_deletes=True)


# what a manifest reference points at: a blob (config or layer; kept alive by the reference) or a child manifest of
# an index (kept alive too: it must exist in the same repository when the index is pushed)
REF_CONFIG, REF_LAYER, REF_MANIFEST = "config", "layer", "manifest"


class ManifestRef(Base):
    """Position ``position`` of a manifest's references: config (0), layers, or an index's child manifests."""

    __tablename__ = "manifest_refs"

    manifest_id: Mapped[int] = mapped_column(ForeignKey("manifests.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    digest: Mapped[str] = mapped_column(String(DIGEST_LEN), index=True)
    kind: Mapped[str] = mapped_column(String(16))

    manifest: Mapped[Manifest] = relationship(back_populates="refs")


def count_references(session: Session, digest: str) -> int:
    """How many uses (tarball, config or layer position of any image; a stored manifest's bytes; a config or
    layer reference of any manifest) ``digest`` has; 0 = GC may reclaim it."""
    images = session.scalar(select(func.count()).select_from(Image)
                            .where((Image.blob_digest == digest) | (Image.config_digest == digest)))
    layers = session.scalar(select(func.count()).select_from(ImageLayer).where(ImageLayer.blob_digest == digest))
    manifests = session.scalar(select(func.count()).select_from(Manifest).where(Manifest.digest == digest))
    refs = session.scalar(select(func.count()).select_from(ManifestRef)
                          .where(ManifestRef.digest == digest, ManifestRef.kind != REF_MANIFEST))
    return int(images or 0) + int(layers or 0) + int(manifests or 0) + int(refs or 0)


class Host(Base):
    """The last heartbeat of a ``docket agent`` (docket/registry/hosts.py): one row per host id, kept in the
    database so that every registry instance sharing it lists the same fleet; rows a day old are removed."""

    __tablename__ = "hosts"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    peer_address: Mapped[str | None] = mapped_column(String(64), nullable=True)
    listen_address: Mapped[str | None] = mapped_column(String(300), nullable=True)
    remote_address: Mapped[str | None] = mapped_column(String(64), nullable=True)  # what the registry saw
    version: Mapped[str] = mapped_column(String(64))
    interval: Mapped[float] = mapped_column(Float)  # seconds between its heartbeats: silent after 3 of them
    blobs: Mapped[int] = mapped_column(BigInteger)
    blob_bytes: Mapped[int] = mapped_column(BigInteger)
    digests: Mapped[str] = mapped_column(Text)  # JSON list, capped (hosts.MAX_DIGESTS)
    served_blobs: Mapped[int] = mapped_column(BigInteger)
    served_bytes: Mapped[int] = mapped_column(BigInteger)
    downloaded_blobs: Mapped[int] = mapped_column(BigInteger)
    downloaded_bytes: Mapped[int] = mapped_column(BigInteger)
    started: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


# -- several registry instances on one database (docs/instances.md) ----------------------------------------------
class RegistryInstance(Base):
    """One running ``docket-registry`` process: written at start, refreshed by its heartbeat (``instances.py``).
    An instance not seen for ``instances.LIVE_FOR`` seconds is dead: its leases and push activity stop counting."""

    __tablename__ = "registry_instances"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # uuid4 hex, new for every process
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(String(300))  # where it serves (its own address, not the load balancer's)
    version: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    leader: Mapped[bool] = mapped_column(default=False)  # holds the maintenance lock (GC, retention, scrubber)
    push_since: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)  # PushActivity.since()


class UploadSession(Base):
    """A /v2 upload session (``uploads.py``): its bytes are ``uploads/session-<id>`` in the shared location; any
    instance continues it (restoring the running hash by reading the part when it does not have it)."""

    __tablename__ = "upload_sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # uuid4, as in the Location URL
    repository: Mapped[str] = mapped_column(String(255))
    size: Mapped[int] = mapped_column(BigInteger, default=0)  # bytes received completely
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    touched_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # the start of the push it belongs to (PushActivity.since when it was opened): GC keeps what that push
    # uploaded before the session while the session is open
    push_since: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    instance: Mapped[str] = mapped_column(String(32))  # the instance that served its last request


class BlobLease(Base):
    """A plain-HTTP download of a blob in flight on one instance (``blobs.DownloadCounter``): GC, on whichever
    instance runs it, waits for it. One row per (instance, digest) while that instance has at least one."""

    __tablename__ = "blob_leases"

    instance: Mapped[str] = mapped_column(String(32), primary_key=True)
    digest: Mapped[str] = mapped_column(String(DIGEST_LEN), primary_key=True)
    since: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BlobDamage(Base):
    """A blob the scrubber found corrupt or missing (``scrub.py``): every instance refuses to serve or seed it
    until a verified upload replaces it. No foreign key: GC may remove the blob's row first."""

    __tablename__ = "blob_damage"

    digest: Mapped[str] = mapped_column(String(DIGEST_LEN), primary_key=True)
    reason: Mapped[str] = mapped_column(String(300))
    detected_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
