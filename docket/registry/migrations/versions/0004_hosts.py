"""Agent heartbeats (docket/registry/hosts.py): one row per ``docket agent`` host, its last report.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("hostname", sa.String(255), nullable=False),
        sa.Column("peer_address", sa.String(64), nullable=True),
        sa.Column("listen_address", sa.String(300), nullable=True),
        sa.Column("remote_address", sa.String(64), nullable=True),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("interval", sa.Float(), nullable=False),
        sa.Column("blobs", sa.BigInteger(), nullable=False),
        sa.Column("blob_bytes", sa.BigInteger(), nullable=False),
        sa.Column("digests", sa.Text(), nullable=False),
        sa.Column("served_blobs", sa.BigInteger(), nullable=False),
        sa.Column("served_bytes", sa.BigInteger(), nullable=False),
        sa.Column("downloaded_blobs", sa.BigInteger(), nullable=False),
        sa.Column("downloaded_bytes", sa.BigInteger(), nullable=False),
        sa.Column("started", sa.DateTime(), nullable=True),
        sa.Column("first_seen", sa.DateTime(), nullable=False),
        sa.Column("last_seen", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_hosts_last_seen", "hosts", ["last_seen"])


def downgrade() -> None:
    op.drop_index("ix_hosts_last_seen", table_name="hosts")
    op.drop_table("hosts")
