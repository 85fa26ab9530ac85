"""The registry's locks: one per blob digest, and one for tag and reference writes.

Blob locks (sorted, taken once) are held around everything that makes a blob referenced or removes it; the tag
lock around every transaction that changes tags, manifest rows or reference marks (SQLite has one writer anyway).
GC takes both, so a blob it deletes is never one a push is about to reference.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator


class KeyedLocks:
    """One lock per key (digest), created on demand and dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[threading.Lock, int]] = {}
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (threading.Lock(), 0))
            self._locks[key] = (lock, users + 1)
        lock.acquire()
        try:
            yield
        finally:
            lock.release()
            with self._guard:
                lock, users = self._locks[key]
                if users <= 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


class Locks:
    def __init__(self) -> None:
        self.blobs = KeyedLocks()
        self.tags = threading.Lock()

    def blob(self, digest: str) -> contextlib.AbstractContextManager[None]:
        return self.blobs.hold(digest)

    @contextlib.contextmanager
    def all_blobs(self, digests: Iterable[str]) -> Iterator[contextlib.ExitStack]:
        """The locks of ``digests`` in sorted order (no deadlock between two pushes); more can be added to the
        stack yielded."""
        with contextlib.ExitStack() as stack:
            for digest in sorted(set(digests)):
                stack.enter_context(self.blobs.hold(digest))
            yield stack
