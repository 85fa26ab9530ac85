"""Several registry instances on one database: the instances, /v2 upload sessions, download leases and scrub
damage become rows (docs/instances.md).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "registry_instances",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("url", sa.String(300), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("seen_at", sa.DateTime(), nullable=False),
        sa.Column("leader", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("push_since", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_registry_instances_seen_at", "registry_instances", ["seen_at"])
    op.create_table(
        "upload_sessions",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("repository", sa.String(255), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("touched_at", sa.DateTime(), nullable=False),
        sa.Column("push_since", sa.DateTime(), nullable=False),
        sa.Column("instance", sa.String(32), nullable=False),
    )
    op.create_index("ix_upload_sessions_touched_at", "upload_sessions", ["touched_at"])
    op.create_table(
        "blob_leases",
        sa.Column("instance", sa.String(32), primary_key=True),
        sa.Column("digest", sa.String(135), primary_key=True),
        sa.Column("since", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "blob_damage",
        sa.Column("digest", sa.String(135), primary_key=True),
        sa.Column("reason", sa.String(300), nullable=False),
        sa.Column("detected_at", sa.DateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("blob_damage")
    op.drop_table("blob_leases")
    op.drop_index("ix_upload_sessions_touched_at", table_name="upload_sessions")
    op.drop_table("upload_sessions")
    op.drop_index("ix_registry_instances_seen_at", table_name="registry_instances")
    op.drop_table("registry_instances")
