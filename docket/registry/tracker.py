"""The registry's view of its BitTorrent tracker: a managed opentracker child, or an external one.

Managed (no ``--tracker``): the registry runs opentracker bound to the advertise address and owns its whitelist.
A new info hash is added and opentracker reloaded (SIGHUP) *before* that blob's seeder starts, so the seeder's
first announce is accepted. If opentracker dies, the seeder supervisor restarts it and then every seeder, since a
fresh tracker has an empty peer table and leechers re-announce only every ~30 minutes.

External (``--tracker HOST:PORT``): ``docket-tracker`` on the tracker host runs opentracker and keeps its whitelist
in sync with ``GET /api/v1/tracker/whitelist``; with an opentracker of your own (built with a whitelist, as
Debian's is) do the same, for example every 10 seconds::

    while sleep 10; do
      curl -fsS http://REGISTRY:8000/api/v1/tracker/whitelist -o /etc/opentracker/whitelist.new &&
      if ! cmp -s /etc/opentracker/whitelist.new /etc/opentracker/whitelist; then
        mv /etc/opentracker/whitelist.new /etc/opentracker/whitelist && kill -HUP "$(pidof opentracker)"
      fi
    done

Until a new hash is in the external whitelist the tracker refuses announces for it, and a refused ctorrent retries
only every ~15 s: so a push waits (bounded) until the tracker accepts its layers and then re-announces the seeders
it refused (``ExternalTracker.settle``), and a tracker that lost its peers (restarted) makes every seeder announce
again (``needs_restart``).

Private (a registry with read tokens): the managed opentracker runs behind a guard (docket/torrent/guard.py) that
answers announces and single-torrent scrapes only, never stats or a full scrape, which would list every info hash.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from docket.errors import ServiceUnavailable
from docket.registry.config import parse_host_port
from docket.torrent import Opentracker, ScrapeResult, find_opentracker, scrape
from docket.torrent.processes import record_pid, stop_orphan
from docket.torrent.tracker import announce_ok

log = logging.getLogger(__name__)


def tcp_accepts(host: str, port: int, timeout: float = 1.0) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=timeout):
        return True
    return False


class ExternalTracker:
    """An opentracker someone else runs: we only announce to it, scrape it and check it answers TCP.

    It can restart without us (``docket-tracker`` restarted, its host rebooted): the new opentracker knows no
    peer, and our seeders would announce again only after the tracker's interval (~30 minutes), so pulls found
    no seeder. ``needs_restart`` notices (the tracker was unreachable and answers again, or a torrent it listed
    our seeder for has no seeder any more) and the seeder supervisor then restarts every seeder: each announces
    at once.
    """

    managed = False
    CHECK_EVERY = 5.0  # seconds between checks that the tracker still knows our seeders
    SETTLE_TIMEOUT = 12.0  # a push waits at most this long for the tracker to accept its hashes

    def __init__(self, address: str) -> None:
        self.host, self.port = parse_host_port(address)
        self.announce_url = f"http://{self.host}:{self.port}/announce"
        self._hashes: set[str] = set()
        self._lock = threading.Lock()
        self._probe: str | None = None  # an info hash the tracker listed a seeder for
        self._down = False
        self._next_check = 0.0
        self._settle_failed = False
        self.restarts = 0  # times the tracker was seen to have lost its peers

    def start(self, info_hashes: Iterable[str] = ()) -> None:
        with self._lock:
            self._hashes = set(info_hashes)
        log.info("using external tracker %s; keep its whitelist in sync with GET /api/v1/tracker/whitelist",
                 self.announce_url)

    def stop(self) -> None:
        pass

    def add(self, info_hash: str) -> None:
        with self._lock:  # the operator's sync job (docket-tracker) reads the whitelist endpoint
            self._hashes.add(info_hash)

    def discard(self, info_hash: str) -> None:
        with self._lock:
            self._hashes.discard(info_hash)
            if self._probe == info_hash:
                self._probe = None

    def alive(self) -> bool:
        return tcp_accepts(self.host, self.port)

    def needs_restart(self) -> bool:
        """True when the tracker has lost its peer table; checked at most every CHECK_EVERY seconds."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.CHECK_EVERY
        if not tcp_accepts(self.host, self.port, 1.0):
            if not self._down:
                log.warning("external tracker %s does not answer", self.announce_url)
            self._down = True
            return False
        if self._down:
            self._down = False
            return self._lost("answers again")
        with self._lock:
            probe = self._probe
            candidates = [probe] if probe else random.sample(sorted(self._hashes), min(3, len(self._hashes)))
        for info_hash in candidates:
            try:
                seeders = scrape(self.announce_url, info_hash, timeout=2.0).complete
            except Exception:  # noqa: BLE001 - down or odd: the next check decides
                return False
            if probe is not None:
                return seeders == 0 and self._lost(f"lists no seeder for {info_hash} any more")
            if seeders:
                with self._lock:
                    if info_hash in self._hashes:
                        self._probe = info_hash
                break
        return False

    def settle(self, info_hashes: Iterable[str], timeout: float | None = None) -> list[str]:
        """Wait until the tracker accepts every hash (its sync job polled our whitelist), at most ``timeout``
        seconds; return the accepted ones it lists no seeder for. Their seeders announced while the tracker still
        refused the hash and retry only every ~15 s: a pull right after the push found no seeder for that long."""
        hashes = list(dict.fromkeys(info_hashes))
        left = set(hashes)
        # after one wait in vain (no sync job follows us), later pushes are not held up again until one succeeds
        wait = 0.0 if self._settle_failed else self.SETTLE_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + wait
        while left:
            for info_hash in sorted(left):
                try:
                    if announce_ok(self.announce_url, info_hash, 2.0):
                        left.discard(info_hash)
                except ServiceUnavailable:  # down: nothing to wait for (needs_restart re-announces when it is back)
                    log.warning("external tracker %s cannot be reached; pulls use HTTP until it is back",
                                self.announce_url)
                    return []
                except Exception:  # noqa: BLE001 - an odd answer: retried until the deadline
                    pass
            if not left or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
        self._settle_failed = bool(left)
        if left:
            log.warning("external tracker %s does not accept %d info hash(es) after %.0fs (is docket-tracker "
                        "following this registry?); pulls wait for it or use HTTP", self.announce_url, len(left),
                        wait)
        unseeded = []
        for info_hash in hashes:
            if info_hash in left:
                continue
            with contextlib.suppress(Exception):
                if scrape(self.announce_url, info_hash, timeout=2.0).complete == 0:
                    unseeded.append(info_hash)
        return unseeded

    def _lost(self, why: str) -> bool:
        self.restarts += 1
        with self._lock:
            self._probe = None
        log.warning("external tracker %s %s: it has lost its peers (restarted?); every seeder announces again",
                    self.announce_url, why)
        return True

    def restart(self) -> None:
        pass

    def scrape(self, info_hash: str) -> ScrapeResult:
        return scrape(self.announce_url, info_hash)

    def check(self) -> dict[str, Any]:
        ok = self.alive()
        result: dict[str, Any] = {"ok": ok, "managed": False, "announce_url": self.announce_url}
        if not ok:
            result["error"] = f"cannot connect to {self.host}:{self.port}"
        return result


class ManagedTracker:
    """An opentracker child bound to the advertise address, with a whitelist we keep current."""

    managed = True

    def __init__(self, bind_ip: str, port: int, workdir: Path, *, enabled: bool = True,
                 private: bool = False) -> None:
        self.bind_ip = bind_ip
        self.port = port
        self.workdir = Path(workdir)
        self.enabled = enabled  # False in unit tests: the whitelist is kept but no process is run
        self.private = private  # read tokens: no stats, no full scrape (a guard in front of opentracker)
        self.announce_url = f"http://{bind_ip}:{port}/announce"
        self._hashes: set[str] = set()
        self._lock = threading.RLock()
        self._proc: Opentracker | None = None
        self.restarts = 0

    def preflight(self) -> None:
        """Raise ToolMissing (with the install hint) before anything else is started."""
        if self.enabled:
            find_opentracker()

    def start(self, info_hashes: Iterable[str] = ()) -> None:
        with self._lock:
            self._hashes = set(info_hashes)
            if not self.enabled:
                return
            self._spawn()

    @property
    def _pid_file(self) -> Path:
        return self.workdir.parent / "opentracker.pid"

    def _spawn(self) -> None:
        # A registry killed with SIGKILL leaves its opentracker running (it runs as nobody, so a parent-death
        # signal would not survive the user switch): stop that one, which we started, before taking the port.
        stop_orphan(self._pid_file, "opentracker", str(self.workdir))
        # opentracker sets SO_REUSEPORT: started on a port another tracker holds, it "succeeds" and the kernel
        # splits connections between the two, so half the announces hit a tracker without our whitelist.
        if tcp_accepts(self.bind_ip, self.port, 0.5):
            raise ServiceUnavailable(
                f"tracker port {self.bind_ip}:{self.port} is already in use",
                "stop the other tracker, choose another --tracker-port, or use it as external with --tracker",
            )
        self.workdir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.workdir.chmod(0o755)  # opentracker drops to nobody inside this chroot
        proc = Opentracker(self.bind_ip, self.port, self.workdir, admin_ip=self.bind_ip,
                           log_path=self.workdir.parent / "tracker.log", guarded=self.private)
        proc.start(sorted(self._hashes))
        self._proc = proc
        if proc.pid is not None:
            record_pid(self._pid_file, proc.pid)
        deadline = time.monotonic() + 10
        while not tcp_accepts(self.bind_ip, self.port, 0.5):
            if not proc.alive() or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        log.info("opentracker pid %s listening on %s (%d whitelisted)", proc.pid, self.announce_url,
                 len(self._hashes))

    def stop(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._proc.stop()
                self._proc = None
                self._pid_file.unlink(missing_ok=True)

    def add(self, info_hash: str) -> None:
        """Whitelist ``info_hash`` and make sure opentracker has reloaded before returning."""
        with self._lock:
            if info_hash in self._hashes:
                return
            self._hashes.add(info_hash)
            if self._proc is not None and self._proc.alive():
                self._proc.set_whitelist(sorted(self._hashes))
                self._wait_loaded(info_hash)

    def discard(self, info_hash: str) -> None:
        with self._lock:
            if info_hash not in self._hashes:
                return
            self._hashes.discard(info_hash)
            if self._proc is not None and self._proc.alive():
                self._proc.set_whitelist(sorted(self._hashes))

    def _wait_loaded(self, info_hash: str, timeout: float = 3.0) -> None:
        """SIGHUP is asynchronous: poll until opentracker accepts announces for the hash (best effort)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if announce_ok(self.announce_url, info_hash, 1.0):
                    return
            time.sleep(0.05)
        log.warning("opentracker did not confirm whitelisting %s within %.0fs", info_hash, timeout)

    def alive(self) -> bool:
        with self._lock:
            return self._proc is not None and self._proc.alive()

    def needs_restart(self) -> bool:
        with self._lock:
            return self.enabled and self._proc is not None and not self._proc.alive()

    def restart(self) -> None:
        with self._lock:
            old = self._proc
            if old is not None:
                with contextlib.suppress(Exception):
                    old.stop()
            self.restarts += 1
            log.warning("opentracker (pid %s) died; restarting it (restart #%d)", old.pid if old else None,
                        self.restarts)
            self._spawn()

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def scrape(self, info_hash: str) -> ScrapeResult:
        return scrape(self.announce_url, info_hash)

    def check(self) -> dict[str, Any]:
        result: dict[str, Any] = {"managed": True, "announce_url": self.announce_url, "enabled": self.enabled,
                                  "private": self.private}
        if not self.enabled:
            result["ok"] = True
            return result
        alive = self.alive()
        accepts = alive and tcp_accepts(self.bind_ip, self.port)
        result.update(ok=alive and accepts, pid=self.pid, restarts=self.restarts)
        if not alive:
            result["error"] = "opentracker is not running"
        elif not accepts:
            result["error"] = f"opentracker does not accept connections on {self.bind_ip}:{self.port}"
        return result


Tracker = ManagedTracker | ExternalTracker
