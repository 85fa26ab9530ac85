"""Registry V2 / OCI distribution API (docs/v2.md): manifests and their references, sha512-wide digest columns,
per-layer diff_id and media type (layers pushed by ``docker push`` are compressed: digest != diff_id).

Existing rows keep working unchanged; docket-pushed images get their V2 manifest at the next start (the registry
writes it, see ``Manifests.backfill``).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

WIDE = sa.String(135)
NARROW = sa.String(71)


def upgrade() -> None:
    with op.batch_alter_table("blobs") as batch:
        batch.alter_column("digest", existing_type=NARROW, type_=WIDE)
    with op.batch_alter_table("images") as batch:
        for column in ("image_id", "blob_digest", "config_digest", "manifest_digest"):
            batch.alter_column(column, existing_type=NARROW, type_=WIDE)
    with op.batch_alter_table("image_layers") as batch:
        batch.alter_column("blob_digest", existing_type=NARROW, type_=WIDE)
        batch.add_column(sa.Column("diff_id", WIDE, nullable=True))
        batch.add_column(sa.Column("media_type", sa.String(255), nullable=True))
    op.create_table(
        "manifests",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("repository", sa.String(255), nullable=False),
        sa.Column("digest", WIDE, sa.ForeignKey("blobs.digest"), nullable=False),
        sa.Column("media_type", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("artifact_type", sa.String(255), nullable=True),
        sa.Column("subject_digest", WIDE, nullable=True),
        sa.Column("config_digest", WIDE, nullable=True),
        sa.Column("annotations", sa.String(), nullable=True),
        sa.Column("origin", sa.String(16), nullable=False, server_default="v2"),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.UniqueConstraint("repository", "digest", name="uq_manifests_repository_digest"),
    )
    op.create_index("ix_manifests_repository", "manifests", ["repository"])
    op.create_index("ix_manifests_digest", "manifests", ["digest"])
    op.create_index("ix_manifests_subject_digest", "manifests", ["subject_digest"])
    op.create_table(
        "manifest_refs",
        sa.Column("manifest_id", sa.Integer(), sa.ForeignKey("manifests.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer(), primary_key=True),
        sa.Column("digest", WIDE, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
    )
    op.create_index("ix_manifest_refs_digest", "manifest_refs", ["digest"])


def downgrade() -> None:
    op.drop_index("ix_manifest_refs_digest", table_name="manifest_refs")
    op.drop_table("manifest_refs")
    for name in ("ix_manifests_subject_digest", "ix_manifests_digest", "ix_manifests_repository"):
        op.drop_index(name, table_name="manifests")
    op.drop_table("manifests")
    with op.batch_alter_table("image_layers") as batch:
        batch.drop_column("media_type")
        batch.drop_column("diff_id")
