"""This registry process among the others that share its database (docs/instances.md).

Every process writes a row in ``registry_instances`` at start and refreshes it every ``beat`` seconds (a
``Periodic``): what the other instances need to know about it, read from the database and never from memory:

- that it is alive (``seen_at``): the download leases and push activity of an instance not seen for ``LIVE_FOR``
  seconds stop counting (it was killed; its requests died with it);
- since when it has been receiving pushes without a pause (``push_since``, from its ``PushActivity``): GC on any
  instance keeps the blobs such a push uploaded before its manifest;
- whether it leads: one instance at a time runs GC, retention and the scrubber. ``Leadership`` holds a
  PostgreSQL session advisory lock on a connection of its own; when the leader dies its connection closes, the
  lock is free, and another instance takes it at its next beat. On SQLite the one process always leads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, func, select, text, update
from sqlalchemy import exc as sa_exc

from docket import __version__
from docket.registry.db import Database
from docket.registry.locks import advisory_key
from docket.registry.models import RegistryInstance, utcnow
from docket.registry.periodic import Periodic

log = logging.getLogger(__name__)

BEAT = 2.0  # seconds between heartbeats (and leadership checks)
LIVE_FOR = 15.0  # an instance not seen for this long is dead
FORGET_AFTER = 24 * 3600.0  # rows of dead instances are removed after this long (kept meanwhile for the page)
LEADER_KEY = advisory_key("leader")
# the leader's connection: a leader whose host vanishes sends no FIN, and the server would keep its lock until the
# kernel's keepalive (2 h by default) found the connection dead; with these, ~11 s (PostgreSQL sets them per session)
SERVER_KEEPALIVE = {"tcp_keepalives_idle": 5, "tcp_keepalives_interval": 2, "tcp_keepalives_count": 3,
                    "tcp_user_timeout": 10000}


class Leadership:
    """The maintenance lock: one holder among the instances on one PostgreSQL database; always held on SQLite."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.exclusive = db.engine.dialect.name == "sqlite"  # one process per database: it leads
        self._conn: Connection | None = None
        self._held = self.exclusive
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._held

    def refresh(self) -> bool:
        """Keep the lock (checking its connection still works) or try to take it; False on any database error."""
        if self.exclusive:
            return True
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self.db.engine.connect()
                    for name, value in SERVER_KEEPALIVE.items():  # our host gone: the server ends the lock soon
                        self._conn.execute(text(f"SET {name} = {value}"))
                if self._held:
                    self._conn.execute(text("SELECT 1"))
                else:
                    self._held = bool(self._conn.execute(select(func.pg_try_advisory_lock(LEADER_KEY))).scalar())
                    if self._held:
                        log.info("this instance now leads: it runs GC, retention and the scrubber")
                self._conn.commit()
            except sa_exc.SQLAlchemyError as exc:
                if self._held:
                    log.warning("lost the maintenance lock (database: %s)", str(exc).splitlines()[0])
                self._drop()
            return self._held

    def release(self) -> None:
        if self.exclusive:
            return
        with self._lock:
            if self._conn is not None and self._held:
                with contextlib.suppress(sa_exc.SQLAlchemyError):
                    self._conn.execute(select(func.pg_advisory_unlock(LEADER_KEY)))
                    self._conn.commit()
            self._drop()

    def _drop(self) -> None:
        self._held = False
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.invalidate()  # a session advisory lock ends with its connection
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None


class Instances:
    """This process's row, its heartbeat, and what the live instances say together."""

    def __init__(self, db: Database, *, url: str, push_since: Callable[[datetime | None], datetime | None],
                 beat: float = BEAT, live_for: float = LIVE_FOR) -> None:
        """``push_since``: this process's ``PushActivity.since``, published by every beat."""
        self.db = db
        self.id = uuid.uuid4().hex
        self.url = url
        self.live_for = timedelta(seconds=live_for)
        self._push_since = push_since
        self.leadership = Leadership(db)
        self.shared = not self.leadership.exclusive
        self._worker = Periodic("registry-heartbeat", beat, self.beat)
        self.started = False

    def is_leader(self) -> bool:
        """Whether this instance runs GC, retention and the scrubber now."""
        return self.leadership.held

    def start(self) -> None:
        """Our row, the first leadership attempt, then the heartbeat thread."""
        now = utcnow()
        try:
            with self.db.session() as s:
                s.add(RegistryInstance(id=self.id, hostname=socket.gethostname()[:255], pid=os.getpid(),
                                       url=self.url[:300], version=__version__, started_at=now, seen_at=now,
                                       leader=self.leadership.refresh(), push_since=None))
                s.commit()
        except sa_exc.SQLAlchemyError as exc:  # e.g. a full disk under SQLite: serve reads; the beat retries
            log.warning("could not write this instance's row (%s); the heartbeat retries",
                        str(exc).splitlines()[0])
        self.started = True
        self._worker.start()

    def stop(self) -> None:
        """Stop beating, let go of the lock, remove our row (the others stop counting us at once)."""
        self._worker.stop()
        self.leadership.release()
        if self.started:
            with contextlib.suppress(sa_exc.SQLAlchemyError), self.db.session() as s:
                s.execute(delete(RegistryInstance).where(RegistryInstance.id == self.id))
                s.commit()
        self.started = False

    def beat(self) -> None:
        """Refresh our row (seen, leader, push activity); the leader also forgets long-dead instances."""
        leader = self.leadership.refresh()
        now = utcnow()
        with self.db.session() as s:
            found = s.execute(update(RegistryInstance).where(RegistryInstance.id == self.id).values(
                seen_at=now, leader=leader, push_since=self._push_since(None))).rowcount
            if not found:  # removed by someone (a long pause made us look dead): write it again
                s.add(RegistryInstance(id=self.id, hostname=socket.gethostname()[:255], pid=os.getpid(),
                                       url=self.url[:300], version=__version__, started_at=now, seen_at=now,
                                       leader=leader, push_since=self._push_since(None)))
            if leader:
                s.execute(delete(RegistryInstance).where(
                    RegistryInstance.seen_at < now - timedelta(seconds=FORGET_AFTER)))
            s.commit()

    def live_ids(self, now: datetime | None = None) -> set[str]:
        """The instances seen within ``LIVE_FOR`` (this one always counts)."""
        now = now or utcnow()
        with self.db.session() as s:
            ids = set(s.scalars(select(RegistryInstance.id).where(RegistryInstance.seen_at >= now - self.live_for)))
        return ids | {self.id}

    def others_running(self, now: datetime | None = None) -> list[RegistryInstance]:
        """The other live instances, but those of this host whose process is gone (killed a moment ago: its row
        looks live for ``LIVE_FOR`` more seconds, and a restart must not wait for that)."""
        now = now or utcnow()
        here = socket.gethostname()[:255]
        with self.db.session() as s:
            rows = list(s.scalars(select(RegistryInstance).where(
                RegistryInstance.id != self.id, RegistryInstance.seen_at >= now - self.live_for)))
        return [row for row in rows if row.hostname != here or _running(row.pid)]

    def push_since(self, now: datetime | None = None) -> datetime | None:
        """The earliest start of a push run still going on in any live instance (ours read live)."""
        now = now or utcnow()
        with self.db.session() as s:
            others = s.scalars(select(RegistryInstance.push_since).where(
                RegistryInstance.id != self.id, RegistryInstance.seen_at >= now - self.live_for,
                RegistryInstance.push_since.is_not(None)))
            times = [t for t in others if t is not None]
        own = self._push_since(now)
        if own is not None:
            times.append(own)
        return min(times) if times else None

    def listing(self) -> list[RegistryInstance]:
        """Every known instance, newest first (for /healthz and the page)."""
        with self.db.session() as s:
            return list(s.scalars(select(RegistryInstance).order_by(RegistryInstance.started_at.desc())))


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: running
        return True
    return True


__all__ = ["BEAT", "LIVE_FOR", "Instances", "Leadership"]
