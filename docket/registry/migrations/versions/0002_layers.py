"""Layer-level distribution (docs/layers.md): blob kinds, nullable torrent fields, image formats, image_layers.

Existing rows are whole ``docker save`` tarballs: blobs get kind "tarball", images format "tarball", and keep
being served exactly as before.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("kind", sa.String(16), nullable=False, server_default="tarball"))
        batch.alter_column("info_hash", existing_type=sa.String(40), nullable=True)
        batch.alter_column("piece_length", existing_type=sa.Integer(), nullable=True)
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("format", sa.String(16), nullable=False, server_default="tarball"))
        batch.add_column(sa.Column("config_digest", sa.String(71), nullable=True))
        batch.add_column(sa.Column("manifest_digest", sa.String(71), nullable=True))
        batch.alter_column("blob_digest", existing_type=sa.String(71), nullable=True)
        batch.create_foreign_key("fk_images_config_digest_blobs", "blobs", ["config_digest"], ["digest"])
        batch.create_index("ix_images_config_digest", ["config_digest"])
    op.create_table(
        "image_layers",
        sa.Column("image_id", sa.Integer(), sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("blob_digest", sa.String(71), sa.ForeignKey("blobs.digest"), nullable=False),
    )
    op.create_index("ix_image_layers_blob_digest", "image_layers", ["blob_digest"])


def downgrade() -> None:
    # only possible while every image is still a whole tarball (a layers image has nothing to go back to)
    op.drop_index("ix_image_layers_blob_digest", table_name="image_layers")
    op.drop_table("image_layers")
    with op.batch_alter_table("images") as batch:
        batch.drop_index("ix_images_config_digest")
        batch.drop_constraint("fk_images_config_digest_blobs", type_="foreignkey")
        batch.drop_column("manifest_digest")
        batch.drop_column("config_digest")
        batch.drop_column("format")
        batch.alter_column("blob_digest", existing_type=sa.String(71), nullable=False)
    with op.batch_alter_table("blobs") as batch:
        batch.alter_column("piece_length", existing_type=sa.Integer(), nullable=False)
        batch.alter_column("info_hash", existing_type=sa.String(40), nullable=False)
        batch.drop_column("kind")
