"""The BitTorrent engine interface: what the client's pull and the registry's seeders need from a BitTorrent
implementation, so that a second engine (libtorrent, ...) can be added without touching either.

ctorrent (ctorrent.py, ``CtorrentEngine``) is the first implementation. An engine makes ``Transfer``s: one
torrent being downloaded to a path, or seeded from a complete file. The caller owns the loop: it polls
``status`` and ``completed``, decides on stalls and fallbacks, and stops what it started.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass
class TorrentStatus:
    """The latest progress of a transfer: peers, pieces, totals and rates (ctorrent's status line)."""

    seeds: int
    leechers: int
    swarm: int
    have: int
    total: int
    available: int
    downloaded_mb: int
    uploaded_mb: int
    down_kbps: float
    up_kbps: float
    tracker_failures: int = 0  # consecutive failed announces; resets to 0 on success
    tracker_replies: int = 0  # tracker replies received, failure replies included

    @property
    def fraction(self) -> float:
        """Share of pieces we have, 0.0-1.0."""
        return self.have / self.total if self.total else 0.0

    @property
    def complete(self) -> bool:
        return self.total > 0 and self.have >= self.total


class Transfer(Protocol):
    """One torrent downloading or seeding, as the engine returns it: started. ``stop`` is idempotent."""

    pid: int | None
    listen_port: int | None
    status: TorrentStatus | None  # latest progress, None until the engine reported any
    completed: threading.Event  # set when every piece is on disk and verified (always set for a seed)
    completed_at: float | None  # time.monotonic() of completion: seeding time counts from it
    tracker_failure: str | None  # the tracker's last refusal, for error messages

    def alive(self) -> bool: ...
    def wait_listening(self, timeout: float) -> int: ...
    def stop(self, timeout: float = 5.0) -> None: ...
    def reseed(self) -> Transfer: ...  # a finished download replaced by a fresh seeder (same address and port)
    def halt(self) -> int | None: ...  # stopped at once for a replacement on the same port, which it returns
    def tail(self, n: int = 20) -> list[str]: ...  # the engine's recent output, for error messages


class TorrentEngine(Protocol):
    """Makes transfers (started) and keeps their per-blob state (saved progress, pid records) in a work
    directory. ``download``: to ``save_as``, resumed from what is there, exiting ``seed_hours`` after completion
    even if nobody stops it; ``seed``: a complete, verified file."""

    def download(self, torrent: Path, save_as: Path, *, workdir: Path, listen_ip: str | None = None,
                 port: int | None = None, seed_hours: int = 9999, log_path: Path | None = None,
                 max_download_kbps: int | None = None) -> Transfer: ...

    def seed(self, torrent: Path, blob: Path, *, workdir: Path, listen_ip: str | None = None,
             port: int | None = None, log_path: Path | None = None) -> Transfer: ...

    def stop_all(self, transfers: Sequence[Transfer], timeout: float) -> None:
        """Stop many from the calling thread (cleanup that may not start threads)."""

    def saved_pieces(self, workdir: Path, torrent: Path) -> bytes | None:
        """The bitfield (bit i = piece i, most significant bit first) an earlier download of ``torrent`` in
        ``workdir`` saved, or None: what a resumed download had before peers sent anything (bytes accounting)."""

    def forget(self, workdir: Path) -> None:
        """Drop the saved progress in ``workdir``: the file was changed behind the engine (HTTP, deleted)."""

    def reap(self, workdir: Path, marker: str | None = None, keep: Callable[[int], bool] | None = None) -> bool:
        """Stop a transfer an earlier (killed) process of ours left running on ``workdir``; True if one was.
        ``marker``: text its command line must contain (default: ``workdir``); ``keep(pid)`` True: leave it."""
