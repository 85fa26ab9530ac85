"""Metadata tables: content-addressed blobs and the tags (images) that point at them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String, UniqueConstraint, func, select
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


class Base(DeclarativeBase):
    pass


# blob kinds (docs/layers.md): which ones get a .torrent, a whitelist entry and a seeder
KIND_LAYER, KIND_CONFIG, KIND_TARBALL = "layer", "config", "tarball"
SEEDED_KINDS = frozenset({KIND_LAYER, KIND_TARBALL})
FORMAT_LAYERS, FORMAT_TARBALL = "layers", "tarball"


class Blob(Base):
    """Immutable bytes named by digest, with the torrent that describes them (config blobs have none)."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)  # "sha256:<64 hex>"
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
    before layer-level distribution, one whole ``docker save`` tarball blob (format "tarball")."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("repository", "tag", name="uq_images_repository_tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    repository: Mapped[str] = mapped_column(String(255))
    tag: Mapped[str] = mapped_column(String(128))
    image_id: Mapped[str] = mapped_column(String(71))
    created: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    size: Mapped[int] = mapped_column(BigInteger)
    format: Mapped[str] = mapped_column(String(16), default=FORMAT_TARBALL, server_default=FORMAT_TARBALL)
    blob_digest: Mapped[str | None] = mapped_column(ForeignKey("blobs.digest"), index=True, nullable=True)
    config_digest: Mapped[str | None] = mapped_column(ForeignKey("blobs.digest"), index=True, nullable=True)
    manifest_digest: Mapped[str | None] = mapped_column(String(71), nullable=True)
    pushed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    blob: Mapped[Blob | None] = relationship(back_populates="images", foreign_keys=[blob_digest])
    config: Mapped[Blob | None] = relationship(foreign_keys=[config_digest])
    layers: Mapped[list[ImageLayer]] = relationship(back_populates="image", order_by="ImageLayer.position",
                                                    cascade="all, delete-orphan", passive_deletes=True)

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"


class ImageLayer(Base):
    """Position ``position`` (0 = base) of an image's layer list -> a layer blob (the layer's diff_id)."""

    __tablename__ = "image_layers"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    blob_digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), index=True)

    image: Mapped[Image] = relationship(back_populates="layers")
    blob: Mapped[Blob] = relationship()


def count_references(session: Session, digest: str) -> int:
    """How many uses (tarball, config or layer position of any image) ``digest`` has; 0 = GC may reclaim it."""
    images = session.scalar(select(func.count()).select_from(Image)
                            .where((Image.blob_digest == digest) | (Image.config_digest == digest)))
    layers = session.scalar(select(func.count()).select_from(ImageLayer).where(ImageLayer.blob_digest == digest))
    return int(images or 0) + int(layers or 0)
