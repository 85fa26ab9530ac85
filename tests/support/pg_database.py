"""A PostgreSQL database of its own for a test of several registry instances (docs/instances.md), on the server
``DOCKET_TEST_POSTGRES`` names (a base URL), else the development server below; dropped afterwards.

Stand-in until tests/support/postgres.py (the ``postgres`` fixture: a server per run) is merged: then
``temporary_database`` becomes ``postgres.create_database()`` / ``drop_database``.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator

from sqlalchemy import create_engine, make_url, text

DEV_SERVER = "postgresql+psycopg://docket@127.0.0.1:55432/postgres"


@contextlib.contextmanager
def temporary_database(prefix: str = "docket_inst") -> Iterator[str]:
    """The URL of a fresh, empty database (with the password, for the registry's ``--db``)."""
    base = make_url(os.environ.get("DOCKET_TEST_POSTGRES") or DEV_SERVER)
    admin = create_engine(base.set(database=base.database or "postgres"), isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
