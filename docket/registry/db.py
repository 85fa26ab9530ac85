"""Database engine, sessions and migrations.

Sessions are scoped to a request (``get_session`` caches one on ``flask.g``, closed at teardown) or to a job
(``Database.session()`` as a context manager). The schema is created and upgraded only by alembic, at start-up.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.util.exc import CommandError
from flask import Flask, current_app, g
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from docket.errors import DocketError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 10_000
SQLITE_POOL = {"pool_size": 10, "max_overflow": -1}
# PostgreSQL: every advisory lock (locks.py) holds a pooled connection while it is held, beside the sessions of the
# request threads and the background jobs: a larger pool than SQLAlchemy's 5 + 10, and a bounded wait for one.
PG_POOL = {"pool_size": 10, "max_overflow": 40, "pool_timeout": 30}
PG_CONNECT_TIMEOUT_S = 10  # a server that does not answer (a dropped packet, not a refusal) fails start-up in time
URL_HINT = "give --db as sqlite:////ABSOLUTE/PATH/docket.db or postgresql+psycopg://USER[:PASSWORD]@HOST:PORT/DBNAME"


def _sqlite_pragmas(dbapi_connection: object, connection_record: object) -> None:
    """WAL lets readers go on while a writer commits; the busy timeout waits for locks instead of failing."""
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_engine(url: str) -> Engine:
    """The engine for ``url``: SQLite with its pragmas, or PostgreSQL with a pool sized for the advisory locks.
    DatabaseUnusable for a URL that is not one of those, or whose driver is not installed."""
    try:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            # a file: no server-side limit on connections, and a pool that runs out stalls requests for its
            # timeout (a request's session holds one while a component opens another): never out, 10 kept
            pool = SQLITE_POOL if parsed.database not in (None, "", ":memory:") else {}
            engine = create_engine(parsed, future=True, **pool)
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        if backend == "postgresql":
            return create_engine(parsed, future=True, pool_pre_ping=True, **PG_POOL,
                                 connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S})
    except (sa_exc.ArgumentError, ImportError) as exc:
        raise DatabaseUnusable(f"cannot use the database URL {_safe(url)}: {str(exc).splitlines()[0]}",
                               URL_HINT) from exc
    raise DatabaseUnusable(f"cannot use the database URL {_safe(url)}: docket-registry supports SQLite and "
                           "PostgreSQL", URL_HINT)


def _safe(url: str) -> str:
    """``url`` for a message: without its password (or as given when it does not parse)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except sa_exc.ArgumentError:
        return repr(url)


def alembic_config(url: str) -> Config:
    """An alembic Config built in code (no alembic.ini needed at run time)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


class DatabaseUnusable(DocketError):
    """The database cannot be opened, checked or migrated at start-up (damaged, locked, read-only)."""

    status, code, exit_code = 503, "DATABASE_UNUSABLE", 8


RESTORE_HINT = ("restore it from a backup (the blob files were not touched), or move it aside and start with "
                "--adopt-orphans to register the blobs again (tags must then be pushed again)")


def _unusable(where: str, exc: BaseException, engine: Engine | None = None) -> DatabaseUnusable:
    """One line saying what is wrong with the database at ``where``, and what to do about it."""
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
    if engine is not None and engine.dialect.name == "postgresql":
        return DatabaseUnusable(f"cannot use the database {where}: {reason}", _postgres_hint(reason, engine))
    lower = reason.lower()
    if "locked" in lower or "busy" in lower:
        hint = "another process holds it (another docket-registry on this location?): stop it, or retry"
    elif "readonly" in lower or "read-only" in lower or "unable to open" in lower:
        hint = "make the database file and its directory writable by this user"
    elif "disk is full" in lower or _volume_full(where):
        hint = "free space on its volume (the database needs room for its journal); nothing was changed"
    elif "i/o error" in lower:
        hint = "the disk reports errors: check it (kernel log) before anything else; " + RESTORE_HINT
    else:
        hint = RESTORE_HINT
    return DatabaseUnusable(f"cannot use the database {where}: {reason}", hint)


def _postgres_hint(reason: str, engine: Engine) -> str:
    """What to do about a PostgreSQL server's refusal (psycopg's first line of it)."""
    url = engine.url
    server = f"{url.host or 'localhost'}:{url.port or 5432}"
    lower = reason.lower()
    if "connection refused" in lower or "no such file or directory" in lower:
        return (f"is PostgreSQL running at {server} and listening there (listen_addresses)? Start it, or correct "
                "the host and port in --db")
    if "timeout expired" in lower or "timed out" in lower:
        return f"PostgreSQL at {server} did not answer: check the address in --db and any firewall between"
    if "could not translate host name" in lower or "name or service not known" in lower:
        return f"the host name {url.host!r} in --db does not resolve: correct it"
    if "database" in lower and "does not exist" in lower:
        return (f"create it first (createdb -h {url.host or 'localhost'} -p {url.port or 5432} -U "
                f"{url.username or 'postgres'} {url.database}); the registry creates its tables, not the database")
    if ("password" in lower or "authentication failed" in lower or "pg_hba.conf" in lower
            or ("role" in lower and "does not exist" in lower)):
        return ("check the user and password in --db (postgresql+psycopg://USER:PASSWORD@HOST:PORT/DBNAME) and the "
                "server's pg_hba.conf")
    if "permission denied" in lower or "must be owner" in lower:
        return (f"the role {url.username!r} must be able to create tables: make it the database's owner, or GRANT "
                "CREATE ON SCHEMA public to it")
    if "too many clients" in lower or "connection slots" in lower:
        return ("the server is out of connections: raise its max_connections (each registry instance may use up "
                f"to {PG_POOL['pool_size'] + PG_POOL['max_overflow']})")
    return "see the PostgreSQL server's log for the cause; nothing was changed"


def _volume_full(where: str) -> bool:
    """Whether the directory of the SQLite file ``where`` has (almost) no free space: SQLite then reports a full
    disk as "disk I/O error" when it cannot create its WAL files."""
    directory = Path(where).parent
    try:
        return directory.is_dir() and shutil.disk_usage(directory).free < 1024 * 1024
    except OSError:
        return False


class Database:
    """One engine and session factory per app; never a module-level global."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.sessionmaker = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def where(self) -> str:
        """The database for messages: the SQLite file, or the URL without its password."""
        if self.engine.dialect.name == "sqlite" and self.engine.url.database:
            return self.engine.url.database
        return self.engine.url.render_as_string(hide_password=True)

    def check(self) -> None:
        """Start-up: the database opens and (SQLite) passes ``PRAGMA quick_check``; DatabaseUnusable with a hint
        otherwise, before anything reads or writes it (a damaged file must not become 500s on every request)."""
        try:
            with self.engine.connect() as conn:
                if self.engine.dialect.name == "sqlite":
                    rows = [r[0] for r in conn.exec_driver_sql("PRAGMA quick_check").fetchall()]
                    if rows != ["ok"]:
                        problems = [line for row in rows for line in str(row).splitlines()
                                    if line.strip() and not line.startswith("***")]
                        raise DatabaseUnusable(f"the database {self.where} is damaged: quick_check found "
                                               f"{len(problems)} problem(s), first: {problems[0] if problems else '?'}",
                                               RESTORE_HINT)
                    conn.exec_driver_sql("BEGIN IMMEDIATE")  # writable and not locked by another process
                    conn.exec_driver_sql("ROLLBACK")
                else:
                    conn.execute(text("SELECT 1"))
        except sa_exc.SQLAlchemyError as exc:
            raise _unusable(self.where, exc, self.engine) from exc

    def migrate(self) -> None:
        """Check the database, then upgrade the schema to the newest revision (idempotent); DatabaseUnusable when
        it cannot (damaged, locked, read-only)."""
        self.check()
        try:
            self.upgrade("head")
        except sa_exc.SQLAlchemyError as exc:
            raise _unusable(self.where, exc, self.engine) from exc
        except CommandError as exc:  # e.g. a revision this version does not know: written by a newer docket
            raise DatabaseUnusable(f"cannot migrate the database {self.where}: {str(exc).splitlines()[0]}",
                                   "run the docket-registry version that wrote it, or restore a backup") from exc

    def upgrade(self, revision: str) -> None:
        """Upgrade to ``revision``. SQLite rebuilds a table to change a column (alembic batch mode): foreign key
        enforcement is off meanwhile (dropping a referenced table would fail), and checked afterwards."""
        cfg = alembic_config(self.url)
        sqlite = self.engine.dialect.name == "sqlite"
        with self.engine.connect() as connection:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
                connection.commit()
            try:
                with connection.begin():
                    cfg.attributes["connection"] = connection
                    command.upgrade(cfg, revision)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    connection.commit()
                    if broken:
                        raise RuntimeError(f"database migration left broken foreign keys: {broken[:5]}")
            finally:
                if sqlite:
                    connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                    connection.commit()
        log.debug("database %s at revision %s", self.engine.url.render_as_string(hide_password=True), revision)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A session for a background job; rolled back if the body raises, always closed."""
        session = self.sessionmaker()
        try:
            yield session
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()


def get_session() -> Session:
    """The current request's session (created on first use, closed at teardown)."""
    if "db_session" not in g:
        g.db_session = current_app.extensions["docket"].db.sessionmaker()
    return g.db_session


def _close_session(exc: BaseException | None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        if exc is not None:
            session.rollback()
        session.close()


def init_app(app: Flask) -> None:
    app.teardown_appcontext(_close_session)
