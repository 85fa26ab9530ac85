"""V2 upload sessions (``POST /v2/<name>/blobs/uploads/`` ... ``PUT ?digest=``), see docs/v2.md.

A session is a file ``uploads/session-<uuid4>`` plus, in memory, its repository, committed size and running
sha256, so the final PUT does not read the file again (a sha512 digest re-hashes it). One lock per session:
requests on one session run one at a time. A chunk either lands whole or not at all: it is written after the
committed size and the session takes the new size and hash only when the chunk was received completely; the next
write cuts off anything a failed request left. Sessions live in this process only: a restart forgets them and
start-up empties uploads/. Sessions idle longer than ``timeout`` are removed by ``expire()`` (called when a
session is opened and from the GC loop).

``PushActivity`` tells GC since when uploads have been going on without a pause (open sessions, bodies being
received by either API): a push uploads its blobs before the manifest that references them, so a blob that became
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
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from docket.errors import BlobUploadUnknown, TooManyUploads
from docket.registry.models import utcnow
from docket.registry.store import FileBlobStore, Upload

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
    id: str
    name: str  # the repository it was opened for: another repository's URL does not find it
    path: Path
    touched: float  # clock() of the last request
    size: int = 0  # bytes received completely (the file may hold more after a failed request)
    sha256: Any = field(default_factory=hashlib.sha256)
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: bool = False

    @property
    def range(self) -> str:
        """The spec's (and docker's) ``Range`` value: ``0-<last byte>``, ``0-0`` while empty."""
        return f"0-{max(self.size - 1, 0)}"


class UploadSessions:
    """Every open upload session of this process."""

    def __init__(self, store: FileBlobStore, *, timeout: float = 3600.0, max_sessions: int = MAX_SESSIONS,
                 clock: Callable[[], float] = time.monotonic, activity: PushActivity | None = None) -> None:
        self.store = store
        self.timeout = timeout
        self.max_sessions = max_sessions
        self._clock = clock
        self.activity = activity or PushActivity()  # an open session is a push in progress
        self._sessions: dict[str, UploadSession] = {}
        self._guard = threading.Lock()

    def __len__(self) -> int:
        with self._guard:
            return len(self._sessions)

    def open(self, name: str) -> UploadSession:
        """A new empty session for repository ``name`` (already validated)."""
        self.expire()
        with self._guard:
            if len(self._sessions) >= self.max_sessions:
                raise TooManyUploads(f"{len(self._sessions)} uploads are in progress; the limit is "
                                     f"{self.max_sessions}", "finish or cancel uploads, or retry later")
            session_id = str(uuid.uuid4())
            path = self.store.create_session_file(session_id)
            session = UploadSession(session_id, name, path, touched=self._clock())
            self._sessions[session_id] = session
            self.activity.begin()
        log.debug("upload %s opened for %s", session_id, name)
        return session

    def get(self, name: str, session_id: str) -> UploadSession:
        with self._guard:
            session = self._sessions.get(session_id)
        if session is None or session.name != name:
            raise BlobUploadUnknown(f"no upload {session_id[:100]!r} in progress for repository {name}",
                                    "it finished, was cancelled or expired (or the registry restarted): "
                                    "start the upload again", detail={"uuid": session_id[:100]})
        return session

    @contextlib.contextmanager
    def hold(self, name: str, session_id: str) -> Iterator[UploadSession]:
        """The session, locked against other requests on it (and against expiry)."""
        session = self.get(name, session_id)
        with session.lock:
            if session.closed:  # finished or cancelled while we waited
                raise BlobUploadUnknown(f"upload {session_id} is over", "start the upload again",
                                        detail={"uuid": session_id})
            try:
                yield session
            finally:
                session.touched = self._clock()

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
        session.size, session.sha256 = up.size, hasher

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
        self._forget(session)
        session.path.unlink(missing_ok=True)
        log.debug("upload %s of %s removed (%d bytes)", session.id, session.name, session.size)

    def _forget(self, session: UploadSession) -> None:
        session.closed = True
        with self._guard:
            if self._sessions.get(session.id) is not session:
                return
            del self._sessions[session.id]
        self.activity.end()

    def expire(self, now: float | None = None) -> list[str]:
        """Remove sessions idle for longer than ``timeout`` (a session busy with a request is left alone);
        returns their ids. Cheap: the GC loop may call it on every pass."""
        now = self._clock() if now is None else now
        with self._guard:
            stale = [s for s in self._sessions.values() if now - s.touched > self.timeout]
        expired = []
        for session in stale:
            if not session.lock.acquire(blocking=False):
                continue
            try:
                if not session.closed and now - session.touched > self.timeout:
                    self.discard(session)
                    expired.append(session.id)
            finally:
                session.lock.release()
        if expired:
            log.info("expired %d idle upload session(s) (idle > %.0fs)", len(expired), self.timeout)
        return expired

    def clear(self) -> None:
        """Forget every session and remove its file (shutdown, tests)."""
        with self._guard:
            sessions = list(self._sessions.values())
        for session in sessions:
            with session.lock:
                if not session.closed:
                    self.discard(session)


__all__ = ["PushActivity", "UploadSession", "UploadSessions"]
