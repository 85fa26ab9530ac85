"""What the registry does when its storage fails under it: a full disk, a read-only or broken file system, a
database that cannot be written.

Every write path (blob uploads of both APIs, the whole-tarball split, torrents, manifests, the SQLite commit)
lets the OS or SQLite error propagate; the HTTP edge asks ``storage_error`` what it means, so a full disk is one
507 naming the problem in each API's error shape, never a 500 with a traceback. Uploads whose size is known are
refused before any byte is written when they would leave less than ``--min-free-space`` (``require_space``): the
reserve keeps room for what frees space (tag deletes and GC write to the database too) and for metadata.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from sqlalchemy import exc as sa_exc

from docket.errors import DocketError, NoSpace, ServiceUnavailable
from docket.registry.bodies import human

log = logging.getLogger(__name__)

FULL_HINT = ("free space on the registry's volume (delete tags: GC reclaims their blobs) or grow it; "
             "nothing was stored, so the push can be retried")
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def free_bytes(paths: Iterable[Path]) -> int:
    """The least free space (for an unprivileged writer) among the file systems holding ``paths``."""
    free: list[int] = []
    for path in paths:
        p = Path(path)
        while not p.exists() and p != p.parent:  # e.g. the database file before its first start
            p = p.parent
        free.append(shutil.disk_usage(p).free)
    return min(free) if free else 0


def _chain(exc: BaseException) -> Iterable[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def storage_error(exc: BaseException) -> DocketError | None:
    """The DocketError a storage failure stands for (NoSpace for a full disk or quota, ServiceUnavailable for a
    read-only or failing volume or database), or None when ``exc`` is something else. Messages name the problem
    but no path: they go to clients."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return NoSpace(f"the registry's storage is full ({os.strerror(e.errno)})", FULL_HINT)
        if isinstance(e, OSError) and e.errno == errno.EROFS:
            return ServiceUnavailable("the registry's storage is read-only",
                                      "the operator must make the registry's location writable again")
        if isinstance(e, OSError) and e.errno == errno.EIO:
            return ServiceUnavailable("input/output error on the registry's storage",
                                      "the registry's disk is failing: see its log and the kernel log")
        if isinstance(e, sa_exc.DBAPIError):
            text = str(getattr(e, "orig", e)).lower()
            state = str(getattr(getattr(e, "orig", None), "sqlstate", None) or "")  # PostgreSQL's error class
            if state == "53100":  # disk_full on the PostgreSQL server
                return NoSpace("the database server's storage is full",
                               "the operator must free space for PostgreSQL; nothing was stored, so the push can be "
                               "retried")
            if state in {"40001", "40P01", "55P03"}:  # serialization failure, deadlock, lock not available
                return ServiceUnavailable("the registry's database is busy", "retry in a moment")
            if e.connection_invalidated or state.startswith(("08", "57P")) or (
                    not state and "connection" in text and ("refused" in text or "closed" in text)):
                return ServiceUnavailable("the registry's database server cannot be reached",
                                          "the operator must start PostgreSQL again (or fix the network to it); "
                                          "retry then")
            if "disk is full" in text or "database or disk is full" in text:
                return NoSpace("the registry's storage is full (the database cannot grow)", FULL_HINT)
            if "readonly" in text or "read-only" in text:
                return ServiceUnavailable("the registry's database is read-only",
                                          "the operator must make the database writable again")
            if "locked" in text or "busy" in text:
                return ServiceUnavailable("the registry's database is busy", "retry in a moment")
            if isinstance(e, (sa_exc.OperationalError, sa_exc.DatabaseError)):
                return ServiceUnavailable("the registry's database failed",
                                          "see the registry's log; /healthz shows the database check")
    return None


def require_space(paths: Iterable[Path], nbytes: int, reserve: int) -> None:
    """NoSpace unless ``nbytes`` more still leave ``reserve`` bytes (at least one) free; checked before an upload
    writes (a chunked upload, size unknown, only needs the reserve to be there)."""
    free = free_bytes(paths)
    if free - nbytes < max(reserve, 1):  # with no reserve, still refuse what would fill the disk to the last byte
        if nbytes:
            keeps = f", and it keeps {human(reserve)} free (--min-free-space)" if reserve else ""
            message = f"not enough free space on the registry for {human(nbytes)}: {human(free)} free{keeps}"
        elif free <= 0:
            message = "the registry's storage is full (0 bytes free)"
        else:
            message = (f"not enough free space on the registry: {human(free)} free, below the {human(reserve)} it "
                       f"keeps free (--min-free-space)")
        raise NoSpace(message, FULL_HINT)


def startup_error(exc: BaseException) -> DocketError:
    """An OS or database error that stopped start-up, as one line with a hint (the CLI prints it, no traceback)."""
    reason = str(getattr(exc, "orig", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, OSError) and exc.strerror:
        reason = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    translated = storage_error(exc)
    hint = translated.hint if translated is not None else "run with --log-level debug for the details"
    error = type(translated)(f"start-up failed: {reason}", hint) if translated is not None else \
        DocketError(f"start-up failed: {reason}", hint)
    return error
