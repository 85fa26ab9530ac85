"""Metadata tables: content-addressed blobs and the tags (images) that point at them."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import BigInteger, DateTime, ForeignKey, Integer, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
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


class Blob(Base):
    """Immutable bytes named by digest, with the torrent that describes them."""

    __tablename__ = "blobs"

    digest: Mapped[str] = mapped_column(String(71), primary_key=True)  # "sha256:<64 hex>"
    size: Mapped[int] = mapped_column(BigInteger)
    info_hash: Mapped[str] = mapped_column(String(40), unique=True)
    piece_length: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # set when the last tag pointing here went away; GC deletes after the grace period
    unreferenced_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True, default=None)

    images: Mapped[list[Image]] = relationship(back_populates="blob")

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1]


class Image(Base):
    """A tag: ``repository:tag`` -> the ``docker save`` tarball blob plus its Docker metadata."""

    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("repository", "tag", name="uq_images_repository_tag"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    repository: Mapped[str] = mapped_column(String(255))
    tag: Mapped[str] = mapped_column(String(128))
    image_id: Mapped[str] = mapped_column(String(71))
    created: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    size: Mapped[int] = mapped_column(BigInteger)
    blob_digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest"), index=True)
    pushed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    blob: Mapped[Blob] = relationship(back_populates="images")

    @property
    def ref(self) -> str:
        return f"{self.repository}:{self.tag}"
