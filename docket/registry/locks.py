"""The registry's locks: one per blob digest, one per /v2 upload session, and one for tag and reference writes.

Blob locks (sorted, taken once) are held around everything that makes a blob referenced or removes it; the tag
lock around every transaction that changes tags, manifest rows or reference marks (SQLite has one writer anyway).
GC takes both, so a blob it deletes is never one a push is about to reference.

On SQLite one process owns the location, and a thread lock is enough. On PostgreSQL several registry instances
share the database (docs/instances.md), so each lock is also a PostgreSQL session advisory lock, held on a
connection of its own for as long as the ``with`` block runs: the database decides, not a process's memory. The
thread lock is taken first, so one process never spends two connections on one key. A connection that fails to
unlock is thrown away (closing it ends its locks), never returned to the pool still holding one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterable, Iterator

from sqlalchemy import Connection, func, select

from docket.registry.db import Database

log = logging.getLogger(__name__)

TAGS_KEY = "tags"
STARTUP_KEY = "startup"


def advisory_key(name: str) -> int:
    """A signed 64-bit key for ``pg_advisory_lock``, from the lock's name (``blob:sha256:...``)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


class _Keyed:
    """Thread locks by name, created on demand and dropped when nobody holds or waits for them."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, name: str, blocking: bool = True) -> Iterator[bool]:
        with self._guard:
            lock, users = self._locks.get(name, (threading.Lock(), 0))
            self._locks[name] = (lock, users + 1)
        got = lock.acquire(blocking=blocking)
        try:
            yield got
        finally:
            if got:
                lock.release()
            with self._guard:
                lock, users = self._locks[name]
                if users <= 1:
                    del self._locks[name]
                else:
                    self._locks[name] = (lock, users - 1)


class Locks:
    def __init__(self, db: Database | None = None) -> None:
        """``db``: with a PostgreSQL database every lock is also an advisory lock there (shared by instances)."""
        self._db = db if db is not None and db.engine.dialect.name == "postgresql" else None
        self._keyed = _Keyed()

    @property
    def shared(self) -> bool:
        """Whether the locks hold across registry instances (PostgreSQL)."""
        return self._db is not None

    @property
    def tags(self) -> contextlib.AbstractContextManager[None]:
        """The tag lock: ``with locks.tags:``."""
        return self._named([TAGS_KEY])

    @property
    def startup(self) -> contextlib.AbstractContextManager[None]:
        """The start-up lock (``startup.Reconciler``): instances starting at once reconcile one after the other."""
        return self._named([STARTUP_KEY])

    @contextlib.contextmanager
    def blob(self, digest: str) -> Iterator[None]:
        """The lock of one digest."""
        with self._named([f"blob:{digest}"]):
            yield

    @contextlib.contextmanager
    def all_blobs(self, digests: Iterable[str]) -> Iterator[None]:
        """The locks of ``digests`` in sorted order (on one database connection): two pushes never wait for each
        other in a circle."""
        with self._named([f"blob:{d}" for d in sorted(set(digests))]):
            yield

    @contextlib.contextmanager
    def upload(self, session_id: str, *, blocking: bool = True) -> Iterator[bool]:
        """The lock of one /v2 upload session; yields False when ``blocking`` is off and someone holds it."""
        with self._named([f"upload:{session_id}"], blocking=blocking) as got:
            yield got

    @contextlib.contextmanager
    def _named(self, names: list[str], *, blocking: bool = True) -> Iterator[bool]:
        with contextlib.ExitStack() as stack:
            for name in names:
                if not stack.enter_context(self._keyed.hold(name, blocking)):
                    yield False
                    return
            if self._db is None or not names:
                yield True
                return
            conn = self._db.engine.connect()
            keys = [advisory_key(name) for name in names]
            taken: list[int] = []
            try:
                for key in keys:
                    if blocking:
                        conn.execute(select(func.pg_advisory_lock(key)))
                    elif not conn.execute(select(func.pg_try_advisory_lock(key))).scalar():
                        break
                    taken.append(key)
                conn.commit()  # session locks outlive the transaction; nothing stays open meanwhile
            except BaseException:
                _throw_away(conn)
                raise
            try:
                yield len(taken) == len(keys)
            finally:
                _release(conn, taken)


def _release(conn: Connection, keys: list[int]) -> None:
    try:
        for key in reversed(keys):
            conn.execute(select(func.pg_advisory_unlock(key)))
        conn.commit()
        conn.close()
    except Exception:  # noqa: BLE001 - the locks end with the connection: close it for good
        log.warning("could not release advisory locks; closing their connection", exc_info=True)
        _throw_away(conn)


def _throw_away(conn: Connection) -> None:
    with contextlib.suppress(Exception):
        conn.invalidate()
    with contextlib.suppress(Exception):
        conn.close()
