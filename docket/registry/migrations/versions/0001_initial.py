"""Initial schema: blobs and images (tags).

Revision ID: 0001
Revises:
Create Date: 2026-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "blobs",
        sa.Column("digest", sa.String(71), primary_key=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("info_hash", sa.String(40), nullable=False),
        sa.Column("piece_length", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("unreferenced_at", sa.DateTime(), nullable=True),
        sa.UniqueConstraint("info_hash"),
    )
    op.create_table(
        "images",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("repository", sa.String(255), nullable=False),
        sa.Column("tag", sa.String(128), nullable=False),
        sa.Column("image_id", sa.String(71), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("blob_digest", sa.String(71), sa.ForeignKey("blobs.digest"), nullable=False),
        sa.Column("pushed_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("repository", "tag", name="uq_images_repository_tag"),
    )
    op.create_index("ix_images_blob_digest", "images", ["blob_digest"])


def downgrade() -> None:
    op.drop_index("ix_images_blob_digest", table_name="images")
    op.drop_table("images")
    op.drop_table("blobs")
