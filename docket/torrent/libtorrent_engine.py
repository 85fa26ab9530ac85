"""A seed-only engine on libtorrent: one session, in this process, seeds every blob on one port.

Why: ctorrent seeds one torrent per process, and each process costs ~3.3 MiB of resident memory (mostly the
shared C++ libraries, counted again in each: benchmarks/README.md, issue 14), so an agent holding 100 blobs ran
101 processes on 101 ports at ~440 MiB of summed RSS. Here the agent's seeds live in one libtorrent session
(``LibtorrentSeedEngine``): one listening port per address, no process per blob. Downloads stay on ctorrent
(the pull engine); a finished download is handed over to this engine like to the background seeder's ctorrent.

It implements the ``seed`` half of ``TorrentEngine`` (engine.py); ``download`` is refused. Each seed is a
``LibtorrentSeed`` (the ``Transfer`` protocol: ``alive``, ``stop``, ``status``, ``listen_port``; ``pid`` is
None). Same-host rules (client/peer.py): the session listens and connects from ``listen_ip`` (outgoing
connections and tracker announces bound to it, so the tracker records that address), and accepts several
connections from one IP (same-host ctorrents all connect from 127.0.0.1). The tracker gets our session's port,
not the halted download's: the tracker forgets the download's entry at its interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from docket.torrent.engine import TorrentStatus, Transfer
from docket.torrent.ratelimit import HostRates

log = logging.getLogger(__name__)

SETTINGS: dict[str, Any] = {
    "enable_dht": False, "enable_lsd": False, "enable_upnp": False, "enable_natpmp": False,
    "enable_incoming_utp": False, "enable_outgoing_utp": False,  # TCP only, as ctorrent
    "allow_multiple_connections_per_ip": True,  # same-host peers all connect from 127.0.0.1
    "anonymous_mode": False, "announce_to_all_trackers": True,
    "alert_mask": 0,  # nobody reads alerts: they would pile up in memory
    # every downloader served at once (a LAN of hosts, not the internet), choices made every 2 s, deep send buffers
    "unchoke_slots_limit": -1, "unchoke_interval": 2, "optimistic_unchoke_interval": 4,
    "send_buffer_watermark": 4 * 1024 * 1024, "send_buffer_low_watermark": 1024 * 1024,
    "send_buffer_watermark_factor": 150,
    "cache_size_volatile": 64,
    "aio_threads": 2, "hashing_threads": 1,
    "connections_limit": 400,
}


def available() -> bool:
    try:
        import libtorrent  # noqa: F401
    except ImportError:
        return False
    return True


class LibtorrentSeed:
    """One blob seeded by the session (``Transfer``)."""

    def __init__(self, engine: LibtorrentSeedEngine, handle: Any, session: Any, listen_ip: str | None) -> None:
        self._engine = engine
        self._handle = handle
        self._session = session
        self.listen_ip = listen_ip
        self.pid: int | None = None
        self.completed = threading.Event()
        self.completed.set()
        self.completed_at: float | None = time.monotonic()
        self.tracker_failure: str | None = None
        self._stopped = False

    @property
    def listen_port(self) -> int | None:
        return self._session.listen_port() if not self._stopped else None

    @property
    def status(self) -> TorrentStatus | None:
        if self._stopped or not self._handle.is_valid():
            return None
        st = self._handle.status()
        pieces = st.num_pieces
        return TorrentStatus(seeds=st.num_seeds, leechers=max(0, st.num_peers - st.num_seeds),
                             swarm=max(0, st.list_peers), have=pieces, total=pieces, available=pieces,
                             downloaded_mb=st.all_time_download >> 20, uploaded_mb=st.all_time_upload >> 20,
                             down_kbps=st.download_rate / 1024, up_kbps=st.upload_rate / 1024,
                             tracker_failures=0, tracker_replies=0)

    def alive(self) -> bool:
        if self._stopped or not self._handle.is_valid():
            return False
        st = self._handle.status()
        return not st.errc.value()

    def wait_listening(self, timeout: float) -> int:
        port = self.listen_port
        if not port:
            raise TimeoutError("the libtorrent session is not listening")
        return port

    def stop(self, timeout: float = 5.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._engine.remove(self._handle, self._session)

    def halt(self) -> int | None:
        port = self.listen_port
        self.stop()
        return port

    def reseed(self) -> Transfer:
        return self

    def tail(self, n: int = 20) -> list[str]:
        return []


class LibtorrentSeedEngine:
    """One libtorrent session per listen address, seeding every blob given to ``seed``."""

    def __init__(self, port: int = 0, rates: HostRates | None = None) -> None:
        """``rates``: the process's bandwidth budget; each session (one per address) takes part in it."""
        import libtorrent as lt

        self._lt = lt
        self._port = port
        self._rates = rates
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _session(self, listen_ip: str | None) -> Any:
        ip = listen_ip or "0.0.0.0"
        with self._lock:
            session = self._sessions.get(ip)
            if session is None:
                settings = dict(SETTINGS, listen_interfaces=f"{ip}:{self._port}")
                if listen_ip:
                    settings["outgoing_interfaces"] = listen_ip
                session = self._lt.session(settings)
                self._sessions[ip] = session
                if self._rates:
                    self._rates.libtorrent(session)
                log.info("libtorrent session seeding on %s:%s", ip, session.listen_port())
            return session

    def seed(self, torrent: Path, blob: Path, *, workdir: Path, listen_ip: str | None = None,
             port: int | None = None, log_path: Path | None = None) -> LibtorrentSeed:
        """Seed ``blob`` (complete and verified: seed mode, no hash check) from this process's session."""
        lt = self._lt
        session = self._session(listen_ip)
        params = lt.add_torrent_params()
        params.ti = lt.torrent_info(str(torrent))
        params.save_path = str(Path(blob).parent)
        params.flags |= lt.torrent_flags.seed_mode
        params.flags &= ~lt.torrent_flags.auto_managed
        params.flags &= ~lt.torrent_flags.paused
        if params.ti.files().file_name(0) != Path(blob).name:
            params.ti.rename_file(0, Path(blob).name)
        handle = session.add_torrent(params)
        return LibtorrentSeed(self, handle, session, listen_ip)

    def remove(self, handle: Any, session: Any) -> None:
        try:
            session.remove_torrent(handle)
        except Exception as exc:  # noqa: BLE001 - already gone
            log.debug("removing a torrent: %s", exc)

    def download(self, *args: Any, **kwargs: Any) -> Transfer:
        raise NotImplementedError("LibtorrentSeedEngine only seeds: downloads go through ctorrent")

    def stop_all(self, transfers: Sequence[Transfer], timeout: float) -> None:
        for t in transfers:
            t.stop(timeout=timeout)

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            s.pause()

    def saved_pieces(self, workdir: Path, torrent: Path) -> bytes | None:
        return None

    def forget(self, workdir: Path) -> None:
        pass

    def reap(self, workdir: Path, marker: str | None = None, keep: Any = None) -> bool:
        return False
