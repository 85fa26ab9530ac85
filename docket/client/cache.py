"""The pull cache under ``--location``: directories, one lock per blob, atomic writes, disk space, -o output.

Layout: ``<location>/blobs/<hex>`` (verified blobs, and downloads in progress) and ``<location>/torrents/<hex>/``
(a blob's work directory: its lock, its .torrent, the engine's saved progress and pid record).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from typing import TYPE_CHECKING

from docket import errors

if TYPE_CHECKING:  # annotations only: the background seeder imports this module and needs neither
    from docket.client.progress import Reporter
    from docket.torrent.engine import TorrentEngine

log = logging.getLogger(__name__)

DIR_MODE = 0o700


def ensure_dir(path: Path) -> Path:
    """mkdir -p with 0700 for what we create (never 0644); existing directories are left as they are."""
    try:
        path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    except OSError as exc:
        raise errors.DocketError(f"cannot create directory {path}: {exc.strerror}",
                                 "choose another --location or fix its permissions") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise errors.DocketError(f"cannot write in {path}: permission denied",
                                 "choose another --location (DOCKET_LOCATION) or fix its permissions")
    return path


def cache_dir(location: Path, *parts: str) -> Path:
    """``location/parts...`` created 0700, refused when any part is a symbolic link; symbolic links directly
    inside it are removed. Why: the cache never makes links, and ctorrent and our writers follow them, so a link
    planted in a shared cache (``blobs`` -> /etc, ``<hex>.bf`` -> a victim file) would have a pull write outside
    --location. (--location itself may be a link: the user chose it.)"""
    path = location
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise errors.DocketError(f"{path} is a symbolic link: docket writes nothing through links in its cache",
                                     "remove the link (docket creates the directory again) or choose another "
                                     "--location (DOCKET_LOCATION)")
    ensure_dir(path)
    if len(parts) > 1:  # a blob's work directory: every file in it is ours
        for entry in os.scandir(path):
            if entry.is_symlink():
                unlink_link(Path(entry.path))
    return path


def unlink_link(path: Path) -> Path:
    """Remove a symbolic link at ``path`` (we are about to write there; see cache_dir); ``path`` back."""
    if path.is_symlink():
        log.warning("removing the symbolic link %s in the cache: docket writes nothing through links", path)
        path.unlink()
    return path


@contextlib.contextmanager
def blob_lock(path: Path, engine: TorrentEngine, reporter: Reporter, what: str) -> Iterator[None]:
    """One downloader per blob per host: a second pull waits, then finds the verified file.

    Holding the lock, the transfer a killed earlier pull left writing this blob is stopped (``stop_orphan_writer``):
    two writers must never share the file. A live pull's (still seeding after that pull released the lock) is
    left alone.
    """
    try:
        f = open(path, "a+b")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise errors.DocketError(f"cannot open {path}: {exc.strerror or exc}", local_error_hint(exc)) from exc
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            reporter.info(f"Another docket pull is fetching {what}; waiting for it")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        if stop_orphan_writer(engine, path.parent):
            reporter.info(f"Stopped a ctorrent an interrupted pull left running on {what}")
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def parent_is_a_pull(pid: int) -> bool:
    """True when ``pid``'s parent is this process or another running ``docket`` command."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == os.getpid():
            return True
        argv = Path(f"/proc/{ppid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError, StopIteration):
        return False
    return any(os.path.basename(a) == b"docket" or a.startswith(b"docket.client") for a in argv)


def stop_orphan_writer(engine: TorrentEngine, workdir: Path) -> bool:
    """Stop the transfer the engine recorded in ``workdir`` if it outlived its pull (no docket pull is its
    parent); True when one was stopped."""
    return engine.reap(workdir, keep=parent_is_a_pull)


def local_error_hint(exc: OSError) -> str:
    """What to do about a local file operation that failed, by its errno (never "install ctorrent")."""
    if exc.errno in (errno.EMFILE, errno.ENFILE):
        return "too many open files: raise the limit (ulimit -n) or pull an image with fewer layers"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space, or point --location (DOCKET_LOCATION) at a larger disk"
    return "choose another --location (DOCKET_LOCATION) or fix its permissions"


def ensure_space(directory: Path, files: list[tuple[Path, int]]) -> None:
    """Fail before downloading, not halfway, when ``directory`` cannot hold the ``(path, size)`` files.

    Bytes already on disk (a resumed download) count as written.
    """
    needed = 0
    for path, size in files:
        try:
            have = path.stat().st_blocks * 512  # allocated bytes: ctorrent's files may be sparse
        except OSError:
            have = 0
        needed += max(0, size - have)
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise errors.NoSpace(
            f"not enough disk space in {directory}: the download needs {needed} more bytes, {free} are free",
            "free some space, or point --location (DOCKET_LOCATION) at a larger disk",
        )


def atomic_write(path: Path, data: bytes) -> None:
    """``data`` at ``path`` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_output_path(output: Path) -> Path:
    """The absolute ``-o/--output`` path, refused up front when it cannot be written as a file."""
    output = output.expanduser().absolute()
    if not output.parent.is_dir():
        raise errors.InvalidRequest(f"cannot write {output}: {output.parent} is not a directory",
                                    "create the directory first or choose another -o/--output")
    if output.is_dir():
        raise errors.InvalidRequest(f"-o/--output {output} is a directory", "give a file name")
    try:
        mode = output.lstat().st_mode
    except FileNotFoundError:
        return output
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):  # the tarball would replace a device (/dev/null), a fifo
        raise errors.InvalidRequest(f"-o/--output {output} exists and is not a regular file",
                                    "give the name of a new or regular file")
    return output


def write_output(chunks: Iterable[bytes], output: Path) -> Path:
    """The complete load tarball at ``output`` (temp file in the same directory + atomic rename)."""
    output = check_output_path(output)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.chmod(tmp, 0o644)
        os.replace(tmp, output)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise errors.DocketError(f"cannot write {output}: {exc.strerror or exc}") from exc
    return output
