"""ctorrent as a ``TorrentEngine`` (engine.py): one ``CtorrentProcess`` (ctorrent.py) per transfer, its pid and
bitfield kept in the transfer's work directory."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from docket.torrent.ctorrent import CtorrentProcess, stop_many
from docket.torrent.engine import Transfer
from docket.torrent.processes import record_pid, stop_orphan
from docket.torrent.ratelimit import HostRates

log = logging.getLogger(__name__)


PID_FILE = "ctorrent.pid"  # in a transfer's work directory: the pid of its ctorrent (an orphan's too)
# What a seeder on a LAN address takes for its own IP (-I). ctorrent drops every peer whose IP equals its own, and
# a client on the seeder's host connects to the seeder's LAN address FROM that address (the kernel's source for a
# local destination; ctorrent does not bind outgoing connections): with its real address as its own, the seeder
# drops every same-host pull (measured: 0 bytes in 70 s; with -I: the whole blob at once). No peer ever connects
# from 127.0.0.2 to a LAN address. -I is also sent as the announce's ip=, which opentracker ignores (it records the
# TCP source: the -i address).
SELF_ALIAS = "127.0.0.2"


class CtorrentEngine:
    """The ``TorrentEngine`` (engine.py) of ctorrent: one process per transfer, its pid recorded in the work
    directory, its bitfield saved there (``-b <workdir>/<torrent stem>.bf``).

    ``tied``: the processes die with this one (PR_SET_DEATHSIG: the client's pulls; never the registry's
    seeders, which outlive the request thread that starts them). ``process_factory``: CtorrentProcess, or a test
    double taking the same arguments.
    """

    def __init__(self, *, tied: bool = False, process_factory: Callable[..., Any] = CtorrentProcess,
                 rates: HostRates | None = None) -> None:
        """``rates``: the process's bandwidth budget; every ctorrent started here takes part in it (ratelimit.py)."""
        self.tied = tied
        self._factory = process_factory
        self.rates = rates

    def _make(self, torrent: Path, save_as: Path, **kw: Any) -> Transfer:
        """Started; its pid recorded in the work directory (for ``reap``)."""
        pid_file = Path(kw["workdir"]) / PID_FILE
        if self._factory is CtorrentProcess:
            kw.update(die_with_parent=self.tied, pid_file=pid_file)
        if self.rates:
            kw["extra_args"] = [*kw.get("extra_args", []), *self.rates.ctorrent_args()]
        transfer = self._factory(torrent=torrent, save_as=save_as, **kw)
        transfer.start()
        if self._factory is not CtorrentProcess and isinstance(getattr(transfer, "pid", None), int):
            record_pid(pid_file, transfer.pid)  # a test double: recorded as CtorrentProcess.start does
        return transfer

    def download(self, torrent: Path, save_as: Path, *, workdir: Path, listen_ip: str | None = None,
                 port: int | None = None, seed_hours: int = 9999, log_path: Path | None = None,
                 max_download_kbps: int | None = None) -> Transfer:
        kw: dict[str, Any] = {}
        if max_download_kbps:  # bandwidth cap, per ctorrent (-D, KB/s)
            kw["extra_args"] = ["-D", str(int(max_download_kbps))]
        return self._make(torrent, save_as, workdir=workdir, listen_ip=listen_ip, port=port, exit_hours=seed_hours,
                          log_path=log_path, **kw)

    def seed(self, torrent: Path, blob: Path, *, workdir: Path, listen_ip: str | None = None,
             port: int | None = None, log_path: Path | None = None) -> Transfer:
        """A seeder on a non-loopback address is told (``-I``) that its own address is SELF_ALIAS: see there."""
        kw: dict[str, Any] = {}
        if listen_ip and not ipaddress.IPv4Address(listen_ip).is_loopback:
            kw["extra_args"] = ["-I", SELF_ALIAS]
        return self._make(torrent, blob, workdir=workdir, listen_ip=listen_ip, port=port, seed_only=True,
                          log_path=log_path, **kw)

    def stop_all(self, transfers: Sequence[Transfer], timeout: float) -> None:
        if all(isinstance(t, CtorrentProcess) for t in transfers):
            stop_many(transfers, timeout)  # type: ignore[arg-type]
            return
        for t in transfers:  # test doubles
            try:
                t.stop(timeout=timeout)
            except Exception:  # noqa: BLE001 - cleanup goes on
                log.exception("stopping %r", t)

    def saved_pieces(self, workdir: Path, torrent: Path) -> bytes | None:
        try:
            return (workdir / f"{torrent.stem}.bf").read_bytes()
        except OSError:
            return None

    def forget(self, workdir: Path) -> None:
        for path in [*workdir.glob("*.bf"), workdir / PID_FILE]:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    def reap(self, workdir: Path, marker: str | None = None,
             keep: Callable[[int], bool] | None = None) -> bool:
        pid_file = workdir / PID_FILE
        if keep is not None:
            try:
                if keep(int(pid_file.read_text().split()[0])):
                    return False
            except (OSError, ValueError, IndexError):
                return False
        return stop_orphan(pid_file, "ctorrent", marker or str(workdir))
