"""Alembic migrations create exactly the schema the models describe, and upgrading is idempotent."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from docket.registry.db import Database
from docket.registry.models import Base


def test_migration_matches_models(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'docket.db'}")
    db.migrate()
    db.migrate()  # idempotent at head
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() == "0001"
        assert set(inspect(conn).get_table_names()) == {"alembic_version", "blobs", "images"}
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    db.dispose()
