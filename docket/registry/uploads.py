"""V2 upload sessions (``POST /v2/<name>/blobs/uploads/`` ... ``PUT ?digest=``), see docs/v2.md.

A session is a file ``uploads/session-<uuid4>`` plus a row in ``upload_sessions`` (its repository, committed size
and times), so any registry instance sharing the database and the location continues it, and a restart does not
forget it (docs/instances.md). The running sha256 stays in the memory of the instance that served the last chunk,
so the final PUT does not read the file again; another instance (or this one after a restart) restores it by
reading the part up to the committed size (a sha512 digest re-hashes it anyway). One lock per session
(``Locks.upload``, an advisory lock on PostgreSQL): requests on one session run one at a time, on whichever
instance. A chunk either lands whole or not at all: it is written after the committed size and the session takes
the new size and hash only when the chunk was received completely; the next write cuts off anything a failed
request left. Sessions idle longer than ``timeout`` are removed by ``expire()`` (called when a session is opened
and from the GC loop).

``PushActivity`` tells GC since when uploads have been going on without a pause in this process (bodies being
received by either API; every instance publishes it in its heartbeat, ``instances.py``), and ``open_since`` the
same for open sessions, from their rows: a push uploads its blobs before the manifest that references them, so a blob that became
unreferenced during that run is kept whatever ``--gc-grace`` says, for at most ``max_hold``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update

from docket.errors import BlobUploadUnknown, InvalidRequest, TooManyUploads
from docket.registry.db import Database
from docket.registry.locks import Locks
from docket.registry.models import UploadSession as SessionRow
from docket.registry.models import utcnow
from docket.registry.store import SESSION_PREFIX, FileBlobStore, Upload

log = logging.getLogger(__name__)

MAX_SESSIONS = 1024
HASH_CHUNK = 1024 * 1024


PUSH_PAUSE = 120.0  # seconds without any upload that end a run of push activity (a push's manifest comes sooner)
PUSH_MAX_HOLD = 6 * 3600.0  # GC keeps a run's blobs at most this long, however long uploads go on


class PushActivity:
    """Uploads in progress (open /v2 sessions, request bodies being received) and since when they have run
    without a pause of more than ``pause`` seconds. Wall-clock times: GC compares them with ``unreferenced_at``.
    The hold is bounded (``max_hold``) so that uploads that never stop (a busy registry, or someone trickling a
    session forever) delay GC but cannot pin blobs forever."""

    def __init__(self, *, pause: float = PUSH_PAUSE, max_hold: float = PUSH_MAX_HOLD,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.pause = timedelta(seconds=pause)
        self.max_hold = timedelta(seconds=max_hold)
        self._clock = clock
        self._lock = threading.Lock()
        self._active = 0
        self._since: datetime | None = None
        self._last: datetime | None = None

    def begin(self) -> None:
        with self._lock:
            now = self._clock()
            if self._active == 0 and (self._last is None or now - self._last > self.pause):
                self._since = now  # a new run
            self._active += 1

    def end(self) -> None:
        with self._lock:
            self._active = max(self._active - 1, 0)
            self._last = self._clock()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        self.begin()
        try:
            yield
        finally:
            self.end()

    def touch(self) -> None:
        """A moment of push activity (a blob mounted, or found by HEAD, for a coming manifest)."""
        self.begin()
        self.end()

    def since(self, now: datetime | None = None) -> datetime | None:
        """Start of the current run (at most ``max_hold`` before ``now``); None when nothing was uploaded for
        longer than the pause."""
        now = self._clock() if now is None else now
        with self._lock:
            if self._since is None:
                return None
            if self._active == 0 and (self._last is None or now - self._last > self.pause):
                return None
            return max(self._since, now - self.max_hold)


@dataclass(eq=False)
class UploadSession:
    """One session as a request sees it (read from its row under the session's lock)."""

    id: str
    name: str  # the repository it was opened for: another repository's URL does not find it
    path: Path
    size: int = 0  # bytes received completely (the file may hold more after a failed request)
    sha256: Any = None  # the running hash of the first ``size`` bytes, restored by ``hold`` when needed
    closed: bool = False

    @property
    def range(self) -> str:
        """The spec's (and docker's) ``Range`` value: ``0-<last byte>``, ``0-0`` while empty."""
        return f"0-{max(self.size - 1, 0)}"


STALE_FILE_AGE = 6 * 3600.0  # seconds: a temp upload file untouched this long has no live writer (body deadlines)


class UploadSessions:
    """Every open upload session of every instance on the database, and the running hashes this one holds."""

    def __init__(self, db: Database, store: FileBlobStore, locks: Locks, *, instance: str, timeout: float = 3600.0,
                 max_sessions: int = MAX_SESSIONS, clock: Callable[[], datetime] = utcnow,
                 activity: PushActivity | None = None) -> None:
        """``instance``: this process's id (``Instances.id``), written in the rows it serves."""
        self.db = db
        self.store = store
        self.locks = locks
        self.instance = instance
        self.timeout = timeout
        self.max_sessions = max_sessions
        self._clock = clock
        self.activity = activity or PushActivity()  # request bodies being received (both APIs)
        self._hashers: dict[str, tuple[int, Any]] = {}  # session id -> (size, sha256 of that many bytes)
        self._guard = threading.Lock()

    def __len__(self) -> int:
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(SessionRow)) or 0)

    def open(self, name: str) -> UploadSession:
        """A new empty session for repository ``name`` (already validated)."""
        self.expire()
        open_now = len(self)
        if open_now >= self.max_sessions:
            raise TooManyUploads(f"{open_now} uploads are in progress; the limit is {self.max_sessions}",
                                 "finish or cancel uploads, or retry later")
        session_id = str(uuid.uuid4())
        path = self.store.create_session_file(session_id)
        now = self._clock()
        self.activity.touch()
        run = min(self.activity.since(now) or now, now)  # the push this session is part of began then
        try:
            with self.db.session() as s:
                s.add(SessionRow(id=session_id, repository=name, size=0, created_at=now, touched_at=now,
                                 push_since=run, instance=self.instance))
                s.commit()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        with self._guard:
            self._hashers[session_id] = (0, hashlib.sha256())
        log.debug("upload %s opened for %s", session_id, name)
        return UploadSession(session_id, name, path, 0, hashlib.sha256())

    def get(self, name: str, session_id: str) -> UploadSession:
        """The session as its row says (no running hash: ``hold`` restores it)."""
        try:
            path = self.store.session_path(session_id)  # anything but a uuid4 cannot be one of ours
        except InvalidRequest:
            path, found = None, None
        else:
            with self.db.session() as s:
                row = s.get(SessionRow, session_id)
                found = (row.repository, row.size) if row is not None else None
        if found is None or found[0] != name:
            raise BlobUploadUnknown(f"no upload {session_id[:100]!r} in progress for repository {name}",
                                    "it finished, was cancelled or expired: start the upload again",
                                    detail={"uuid": session_id[:100]})
        assert path is not None
        return UploadSession(session_id, name, path, found[1])

    @contextlib.contextmanager
    def hold(self, name: str, session_id: str) -> Iterator[UploadSession]:
        """The session, locked against other requests on it (on any instance) and against expiry, with its
        running hash; its row is touched (and takes the new size) when the request ends."""
        self.get(name, session_id)  # unknown ids answer at once, without a lock
        with self.locks.upload(session_id):
            session = self.get(name, session_id)
            session.sha256 = self._restore_hash(session)
            try:
                yield session
            finally:
                if not session.closed:
                    self._save(session)

    def _restore_hash(self, session: UploadSession) -> Any:
        """The sha256 of the session's first ``size`` bytes: ours if we served its last chunk, else read from the
        part file (a session continued on another instance, or after a restart)."""
        with self._guard:
            cached = self._hashers.get(session.id)
        if cached is not None and cached[0] == session.size:
            return cached[1].copy()
        hasher = hashlib.sha256()
        try:
            with open(session.path, "rb") as f:
                left = session.size
                while left and (chunk := f.read(min(HASH_CHUNK, left))):
                    hasher.update(chunk)
                    left -= len(chunk)
        except FileNotFoundError:
            left = session.size
        if left:  # the part file is gone or shorter than its row says: the session cannot go on
            self._drop(session)
            raise BlobUploadUnknown(f"upload {session.id} lost its data on the registry",
                                    "start the upload again", detail={"uuid": session.id})
        log.info("upload %s: restored its hash from %d bytes of its part file", session.id, session.size)
        return hasher

    def _save(self, session: UploadSession) -> None:
        with self.db.session() as s:
            s.execute(update(SessionRow).where(SessionRow.id == session.id).values(
                size=session.size, touched_at=self._clock(), instance=self.instance))
            s.commit()
        with self._guard:
            self._hashers[session.id] = (session.size, session.sha256.copy())

    def append(self, session: UploadSession, write: Callable[[Upload], None]) -> None:
        """Run ``write(upload)`` appending to the session (caller holds it). The session takes the new size and
        hash only if ``write`` returns; otherwise the file is cut back to what it held."""
        hasher = session.sha256.copy()
        up = self.store.reopen(session.path, session.size, hasher)
        try:
            write(up)
            up.close()
        except BaseException:
            with contextlib.suppress(OSError):
                up.close()
            with contextlib.suppress(OSError):
                with open(session.path, "r+b") as f:
                    f.truncate(session.size)
            raise
        session.size, session.sha256 = up.size, hasher  # written to its row when ``hold`` lets go

    def finish(self, session: UploadSession, algorithm: str = "sha256") -> Upload:
        """End the session (caller holds it): its bytes, fsynced, as an Upload hashed with ``algorithm`` (the
        running sha256, or the file re-hashed). The caller commits it or ``discard()``s it (removing the file)."""
        if algorithm == "sha256":
            hasher = session.sha256
        else:
            hasher = hashlib.new(algorithm)
            with open(session.path, "rb") as f:
                left = session.size
                while left and (chunk := f.read(min(HASH_CHUNK, left))):
                    hasher.update(chunk)
                    left -= len(chunk)
        self._forget(session)
        try:
            up = self.store.reopen(session.path, session.size, hasher)
        except BaseException:
            session.path.unlink(missing_ok=True)
            raise
        try:
            up.finish()
        except BaseException:
            up.discard()
            raise
        return up

    def discard(self, session: UploadSession) -> None:
        """Cancel: forget the session and remove its file (caller holds it)."""
        self._drop(session)
        log.debug("upload %s of %s removed (%d bytes)", session.id, session.name, session.size)

    def _drop(self, session: UploadSession) -> None:
        self._forget(session)
        session.path.unlink(missing_ok=True)

    def _forget(self, session: UploadSession) -> None:
        session.closed = True
        with self._guard:
            self._hashers.pop(session.id, None)
        with self.db.session() as s:
            s.execute(delete(SessionRow).where(SessionRow.id == session.id))
            s.commit()

    def open_since(self, now: datetime | None = None) -> datetime | None:
        """The start of the oldest push with a session not yet expired (idle less than ``timeout``), on any
        instance: GC keeps the blobs a push uploaded before its manifest (see ``PushActivity``)."""
        now = now or self._clock()
        with self.db.session() as s:
            oldest = s.scalar(select(func.min(SessionRow.push_since)).where(
                SessionRow.touched_at >= now - timedelta(seconds=self.timeout)))  # not yet expired
        if oldest is None:
            return None
        oldest = oldest if oldest.tzinfo else oldest.replace(tzinfo=UTC)
        return max(oldest, now - self.activity.max_hold)

    def expire(self, now: datetime | None = None) -> list[str]:
        """Remove sessions idle for longer than ``timeout`` (a session busy with a request, on any instance, is
        left alone); returns their ids. Cheap: the GC loop may call it on every pass."""
        now = now or self._clock()
        limit = now - timedelta(seconds=self.timeout)
        with self.db.session() as s:
            stale = list(s.scalars(select(SessionRow.id).where(SessionRow.touched_at < limit).limit(1000)))
        expired = []
        for session_id in stale:
            with self.locks.upload(session_id, blocking=False) as got:
                if not got:
                    continue
                with self.db.session() as s:
                    row = s.get(SessionRow, session_id)
                    if row is None or row.touched_at >= limit:
                        continue
                    name = row.repository
                self.discard(UploadSession(session_id, name, self.store.session_path(session_id)))
                expired.append(session_id)
        if expired:
            log.info("expired %d idle upload session(s) (idle > %.0fs)", len(expired), self.timeout)
        self._forget_hashes_of_ended()
        return expired

    def _forget_hashes_of_ended(self) -> None:
        """Drop the running hashes of sessions another instance finished, cancelled or expired (their rows are
        gone): nothing else would ever remove them from this process."""
        with self._guard:
            cached = list(self._hashers)
        if not cached:
            return
        with self.db.session() as s:
            alive = set(s.scalars(select(SessionRow.id).where(SessionRow.id.in_(cached))))
        with self._guard:
            for session_id in set(cached) - alive:
                self._hashers.pop(session_id, None)

    def sweep(self, *, exclusive: bool, now: float | None = None) -> int:
        """Remove upload files nobody will finish: at start-up of the only instance (``exclusive``), every
        temporary file and every session file without its row (and rows without their file); on a shared
        location only those untouched for ``STALE_FILE_AGE`` (another instance may be writing them)."""
        now = time.time() if now is None else now
        with self.db.session() as s:
            rows = set(s.scalars(select(SessionRow.id)))
        removed = 0
        for entry in self.store.upload_files():
            session_id = entry.name.removeprefix(SESSION_PREFIX) if entry.name.startswith(SESSION_PREFIX) else None
            if session_id is not None and session_id in rows:
                rows.discard(session_id)
                continue
            try:
                old = now - entry.lstat().st_mtime > STALE_FILE_AGE
            except FileNotFoundError:
                continue
            if exclusive or old:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
                    removed += 1
        if exclusive and rows:  # rows whose part file is gone: nobody can finish them
            with self.db.session() as s:
                s.execute(delete(SessionRow).where(SessionRow.id.in_(rows)))
                s.commit()
        if removed:
            log.info("removed %d stale upload file(s) from %s", removed, self.store.uploads_dir)
        return removed

    def clear(self) -> None:
        """Forget the running hashes this process holds (the sessions stay: another instance, or this one after
        a restart, continues them)."""
        with self._guard:
            self._hashers.clear()


__all__ = ["PushActivity", "UploadSession", "UploadSessions"]
