"""The registry's locks: one per blob digest, and one for tag and reference writes.

Blob locks (sorted, taken once) are held around everything that makes a blob referenced or removes it; the tag
lock around every transaction that changes tags, manifest rows or reference marks (SQLite has one writer anyway).
GC takes both, so a blob it deletes is never one a push is about to reference.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator


class Locks:
    def __init__(self) -> None:
        self.tags = threading.Lock()
        self._blobs: dict[str, tuple[threading.Lock, int]] = {}  # digest -> (lock, holders and waiters)
        self._guard = threading.Lock()

    @contextlib.contextmanager
    def blob(self, digest: str) -> Iterator[None]:
        """The lock of one digest, created on demand and dropped when nobody holds or waits for it."""
        with self._guard:
            lock, users = self._blobs.get(digest, (threading.Lock(), 0))
            self._blobs[digest] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._blobs[digest]
                if users <= 1:
                    del self._blobs[digest]
                else:
                    self._blobs[digest] = (lock, users - 1)

    @contextlib.contextmanager
    def all_blobs(self, digests: Iterable[str]) -> Iterator[None]:
        """The locks of ``digests`` in sorted order: two pushes never wait for each other in a circle."""
        with contextlib.ExitStack() as stack:
            for digest in sorted(set(digests)):
                stack.enter_context(self.blob(digest))
            yield
