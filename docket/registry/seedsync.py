"""Every registry instance seeds every blob (docs/instances.md): the seeders follow the database.

A push through one instance starts that instance's seeder at once (``Swarm.seed``); the others learn of the blob
from the database. ``SeedSync`` runs on every instance of a shared database (PostgreSQL), every ``interval``
seconds: the blobs that should be seeded (seeded kinds, with an info hash, not marked damaged by the scrubber)
against this process's seeders. Missing ones are started (without waiting for them to listen) once the external
tracker accepts their hash (``Swarm.tracker_accepts``: a refused ctorrent would wait ~15 s to announce again; after
``MAX_DEFERRALS`` syncs they start anyway); seeders whose blob
left the wanted set (deleted by GC on the leader, or found damaged) are stopped, each only after a second look
under the blob's lock, which every writer of a blob holds from its file to its row and seeder: a seeder a push
started a moment ago is never stopped for a row this pass read too early.

Each instance seeds from its own ``seeders/<instance id>/`` (ctorrent keeps a bitfield file in its work
directory). ``sweep`` (at start and every ``SWEEP_EVERY`` syncs) stops the seeders of instances on this host that
died (SIGKILL leaves their ctorrents running; one whose process is gone counts at once, before its row ages) and
removes the directories of dead instances: of this host, and of any host once their row is forgotten (a day);
another host's dead instance may have left ctorrents running there, and only that host can stop them.

On SQLite the one process starts and stops its seeders itself, and no sync runs.
"""

from __future__ import annotations

import logging
import shutil
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from docket.registry.db import Database
from docket.registry.instances import Instances
from docket.registry.locks import Locks
from docket.registry.models import SEEDED_KINDS, Blob, BlobDamage
from docket.registry.periodic import Periodic
from docket.registry.seeder import reap_dirs
from docket.registry.store import BlobStore, digest_hex
from docket.registry.swarm import Swarm

log = logging.getLogger(__name__)

INTERVAL = 2.0  # seconds: a blob pushed through another instance is seeded here within about this long
SWEEP_EVERY = 15  # syncs between two sweeps of dead instances' seeder directories
MAX_DEFERRALS = 6  # syncs a start waits for the tracker to accept the hash (about its settle time)


@dataclass(frozen=True)
class SeedPlan:
    """What one sync changes: seeders to start, (digest, info hash); seeders to stop, digests."""

    start: list[tuple[str, str]] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)


def plan(wanted: dict[str, str], running: Iterable[str]) -> SeedPlan:
    """The pure difference: ``wanted`` digest -> info hash (from the database), ``running`` this process's
    seeders."""
    here = set(running)
    return SeedPlan(start=sorted((d, h) for d, h in wanted.items() if d not in here),
                    stop=sorted(here - wanted.keys()))


def wanted_seeds(s: Session, digests: Iterable[str] | None = None) -> dict[str, str]:
    """digest -> info hash of every blob that every instance seeds (``digests``: only among these)."""
    query = select(Blob.digest, Blob.info_hash).where(
        Blob.kind.in_(SEEDED_KINDS), Blob.info_hash.is_not(None), Blob.digest.not_in(select(BlobDamage.digest)))
    if digests is not None:
        query = query.where(Blob.digest.in_(list(digests)))
    return {digest: info_hash for digest, info_hash in s.execute(query) if info_hash is not None}


def dirs_to_keep(instances: Iterable[tuple[str, str]], live: set[str], hostname: str) -> set[str]:
    """Of ``seeders/``'s directories, the ones a sweep leaves alone: live instances', and those of dead instances
    on other hosts (``instances``: (id, hostname) of every row still known)."""
    return live | {instance_id for instance_id, host in instances if host != hostname}


class SeedSync:
    def __init__(self, db: Database, store: BlobStore, locks: Locks, swarm: Swarm, instances: Instances, *,
                 root: Path, interval: float = INTERVAL) -> None:
        """``root``: ``<location>/seeders`` (this instance seeds from ``root/<its id>``). Runs only when the database
        is shared (several instances) and this one seeds."""
        self.db = db
        self.store = store
        self.locks = locks
        self.swarm = swarm
        self.instances = instances
        self.root = root
        self.enabled = instances.shared and swarm.seeders is not None
        self._passes = 0
        self._deferred: dict[str, int] = {}  # digest -> syncs it waited for the tracker's whitelist
        self._synced: frozenset[str] | None = None  # what the last sync wanted and started (for /healthz)
        self._known: dict[str, str] = {}  # digest -> info hash, as last read (to take a stopped one off the list)
        self._worker = Periodic("seed-sync", interval if self.enabled else 0, self.run_once)

    def start(self) -> None:
        """After the swarm started its seeders: those are what this instance seeds until the first sync."""
        if self.enabled:
            assert self.swarm.seeders is not None
            self._synced = frozenset(self.swarm.seeders.digests())
        self._worker.start()

    def stop(self) -> None:
        self._worker.stop()

    def expected(self, digests: Iterable[str]) -> list[str]:
        """Of ``digests`` (blobs the database says are seeded), those this instance should seed by now: /healthz
        must not call an instance degraded for a blob pushed through another one a moment ago (not synced yet, or
        waiting for the tracker's whitelist), or a load balancer would take it out after every push."""
        synced = self._synced
        if not self.enabled or synced is None:
            return list(digests)
        return [digest for digest in digests if digest in synced]

    def sweep(self) -> list[str]:
        """Stop and remove the seeder directories of dead instances (see the module's docstring)."""
        if not self.instances.shared:
            return []
        rows = [(row.id, row.hostname) for row in self.instances.listing()]
        running = {row.id for row in self.instances.others_running()} | {self.instances.id}
        keep = dirs_to_keep(rows, running, socket.gethostname()[:255])
        removed = reap_dirs(self.root, keep)
        if removed:
            log.info("removed the seeder directories of %d instance(s) gone: %s", len(removed), ", ".join(removed))
        return removed

    def run_once(self) -> SeedPlan:
        """One sync; returns what it did (starts whose file or torrent is not there yet are left out)."""
        if self.swarm.seeders is None:
            return SeedPlan()
        self._passes += 1
        if self._passes % SWEEP_EVERY == 0:
            self.sweep()
        running = self.swarm.seeders.digests()  # before the rows: a seeder started after this read is not stopped
        with self.db.session() as s:
            wanted = wanted_seeds(s)
        todo = plan(wanted, running)
        started = []
        for digest, info_hash in todo.start:
            if self.store.stat(digest) is None or not self.swarm.torrent_path(digest).is_file():
                continue  # not all there (a push in flight, a file lost): the next sync looks again
            waited = self._deferred.get(digest, 0)
            if waited < MAX_DEFERRALS and not self.swarm.tracker_accepts(info_hash):
                self._deferred[digest] = waited + 1
                continue
            self._deferred.pop(digest, None)
            self.swarm.reseed(digest, info_hash)
            started.append((digest, info_hash))
        for digest in set(self._deferred) - wanted.keys():
            del self._deferred[digest]
        stopped = [digest for digest in todo.stop if self._retire(digest)]
        self._known = wanted
        self._synced = frozenset(wanted.keys() - self._deferred.keys())
        if started or stopped:
            log.info("seed sync: started %d seeder(s), stopped %d (the database is shared with other instances)",
                     len(started), len(stopped))
        return SeedPlan(started, stopped)

    def _retire(self, digest: str) -> bool:
        """Stop this process's seeder of ``digest`` if, under the blob's lock, it is still not wanted."""
        with self.locks.blob(digest):
            with self.db.session() as s:
                if wanted_seeds(s, [digest]):
                    return False
                row = s.get(Blob, digest)
                info_hash = row.info_hash if row is not None else self._known.get(digest)
            self.swarm.unseed(digest, info_hash)
            if row is None:  # deleted (GC on the leader): its work directory goes too; the leader removed the rest
                shutil.rmtree(self.swarm.seeders_dir / digest_hex(digest), ignore_errors=True)
        return True


__all__ = ["INTERVAL", "MAX_DEFERRALS", "SeedPlan", "SeedSync", "dirs_to_keep", "plan", "wanted_seeds"]
