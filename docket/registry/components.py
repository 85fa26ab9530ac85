"""The registry's components, built once by ``build`` (called by the application factory) and kept in
``app.extensions["docket"]``; blueprints take the ones they need from there. Nothing else sees this object: each
component gets its collaborators in its constructor.

``build`` migrates the database and converts old whole-tarball records (cheap, no processes). The serve command
calls ``start()`` (lock, start-up clean-up, tracker, seeders, GC, scrubber) and ``stop()`` on SIGTERM/SIGINT.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from docket.errors import DocketError
from docket.registry.auth import torrent_secret
from docket.registry.blobs import Blobs, DownloadCounter
from docket.registry.config import RegistryConfig
from docket.registry.db import Database
from docket.registry.gc import GarbageCollector
from docket.registry.hosts import Hosts
from docket.registry.instances import Instances
from docket.registry.locks import Locks
from docket.registry.manifests import Manifests
from docket.registry.retention import Retention, RetentionPolicy
from docket.registry.scrub import BlobScrubber
from docket.registry.seeder import SeederSupervisor
from docket.registry.seedsync import SeedSync
from docket.registry.startup import Reconciler
from docket.registry.store import FileBlobStore
from docket.registry.swarm import Swarm
from docket.registry.tarball import TarballSplitter
from docket.registry.tracker import ExternalTracker, ManagedTracker, Tracker
from docket.registry.uploads import PushActivity, UploadSessions

log = logging.getLogger(__name__)


@dataclass
class Components:
    config: RegistryConfig
    store: FileBlobStore
    db: Database
    locks: Locks
    swarm: Swarm
    scrubber: BlobScrubber
    blobs: Blobs
    manifests: Manifests
    tarballs: TarballSplitter
    uploads: UploadSessions
    downloads: DownloadCounter
    gc: GarbageCollector
    reconciler: Reconciler
    retention: Retention
    hosts: Hosts  # the agents' heartbeats
    instances: Instances  # this process among the registry instances sharing the database
    seed_sync: SeedSync  # shared database: this instance seeds every blob the database lists (seedsync.py)
    started: bool = field(default=False)

    def start(self) -> None:
        """The location's lock, start-up clean-up, then tracker (with the full whitelist), every seeder, GC.
        GC, retention and the scrubber run their timed passes only while this instance leads (instances.py)."""
        self.swarm.preflight()
        self.store.lock()  # before anything touches uploads/, seeders/ or blobs/ (shared on PostgreSQL)
        self.instances.start()  # our row and heartbeat; leads at once when no other instance does
        self._refuse_managed_tracker_beside_others()
        self.seed_sync.sweep()  # shared: seeders left by instances of this host that died (SIGKILL)
        self.uploads.sweep(exclusive=not self.store.shared)  # only old files when other instances share it
        blobs = self.reconciler.run()
        self.manifests.backfill()  # tags pushed before the V2 API get their manifest (docs/v2.md)
        damaged = self.scrubber.damaged()  # marks outlive a restart (blob_damage): those are not seeded
        self.swarm.start([(b.digest, b.info_hash) for b in blobs
                          if b.seeded and b.info_hash and b.digest not in damaged])
        self.started = True
        self.seed_sync.start()  # shared database only: blobs pushed through other instances get our seeder too
        self.gc.start()
        self.retention.start()  # first run one interval from now (retention.py)
        self.scrubber.start()  # first pass now (when leading), in the background; requests are served meanwhile

    def _refuse_managed_tracker_beside_others(self) -> None:
        """Instances sharing a database share one external tracker: with a managed one each would run its own
        opentracker and point every torrent at it (one registry alone on PostgreSQL may manage its tracker)."""
        if not (self.instances.shared and self.swarm.seeding and self.swarm.tracker.managed):
            return
        others = self.instances.others_running()
        if others:
            raise DocketError(
                f"{len(others)} other registry instance(s) run on this database: instances sharing it need one "
                "external tracker, and without --tracker this one would run its own opentracker and point every "
                "torrent at it",
                "run docket-tracker (it follows GET /api/v1/tracker/whitelist of any instance) and start every "
                "instance with --tracker HOST:PORT (README: Several instances)")

    def stop(self) -> None:
        """Stop scrubber, retention, GC, seed sync, seeders, tracker (in that order); idempotent."""
        self.scrubber.stop()
        self.retention.stop()
        self.gc.stop()
        self.seed_sync.stop()
        self.swarm.stop()
        if self.started and self.instances.shared:  # seeders/<our id>/: nobody else uses it
            shutil.rmtree(self.swarm.seeders_dir, ignore_errors=True)
        self.instances.stop()
        self.started = False
        self.store.unlock()


def build(config: RegistryConfig) -> Components:
    """Every component of one registry process, the store's layout made and the database at head."""
    db = Database(config.database_url)
    shared = db.engine.dialect.name != "sqlite"  # several instances may serve this database (docs/instances.md)
    store = FileBlobStore(config.location, shared=shared)  # instances share it
    store.ensure_layout()
    db.migrate()
    locks = Locks(db)  # advisory locks on PostgreSQL: instances share them
    activity = PushActivity()  # request bodies being received: published by the heartbeat for GC
    scheme = "https" if config.tls_cert else "http"
    instances = Instances(db, url=f"{scheme}://{config.advertise_address}:{config.port}",
                          push_since=activity.since)
    uploads = UploadSessions(db, store, locks, instance=instances.id, activity=activity,
                             timeout=config.upload_session_timeout)  # /v2 upload sessions, rows in the database
    leader = instances.is_leader  # GC, retention and the scrubber: timed passes on one instance at a time
    tracker: Tracker = (
        ExternalTracker(config.tracker) if config.tracker
        else ManagedTracker(config.advertise_address, config.tracker_port, store.tracker_dir,
                            enabled=config.seeding, private=bool(config.read_tokens)))
    seeders = (SeederSupervisor(listen_ip=config.seeder_ip, tracker=tracker,  # external: re-announce on restart
                                max_upload_rate=config.max_upload_rate)
               if config.seeding else None)
    # with read tokens: info hashes nobody can compute from content (README "Access control")
    secret = torrent_secret(config.location) if config.read_tokens else None
    # instances sharing the location each keep their ctorrents' bitfield files in seeders/<instance id>/
    seeders_dir = store.seeders_dir / instances.id if shared else store.seeders_dir
    swarm = Swarm(store, tracker, seeders, torrents_dir=store.torrents_dir, seeders_dir=seeders_dir,
                  hash_threads=config.hash_threads, secret=secret)
    scrubber = BlobScrubber(db, store, locks, swarm, interval=config.scrub_interval, leader=leader)
    blobs = Blobs(db, store, swarm, locks, scrubber, space_paths=_space_paths(store, db),
                  min_free_space=config.min_free_space)
    manifests = Manifests(db, store, locks, blobs, swarm, scrubber)
    tarballs = TarballSplitter(db, store, locks, blobs, manifests, chunk_size=config.chunk_size,
                               location_lock=store.locked)
    downloads = DownloadCounter(db, instances)  # lease rows: GC on any instance waits for our downloads
    gc = GarbageCollector(db, locks, blobs, manifests, swarm, downloads, uploads, instances,
                          interval=config.gc_interval, grace=config.gc_grace, leader=leader)
    reconciler = Reconciler(db, store, locks, swarm, adopt_orphans=config.adopt_orphans,
                            adopt_limit=config.threads, instances=instances)
    retention = Retention(db, manifests, RetentionPolicy(config.keep_tags, config.keep_patterns),
                          interval=config.retention_interval, leader=leader)
    tarballs.migrate()  # records made before layers become layer records (docs/layers.md)
    seed_sync = SeedSync(db, store, locks, swarm, instances, root=store.seeders_dir)
    return Components(config, store, db, locks, swarm, scrubber, blobs, manifests, tarballs, uploads, downloads, gc,
                      reconciler, retention, Hosts(db), instances, seed_sync)


def _space_paths(store: FileBlobStore, db: Database) -> list[Path]:
    """Where the registry writes: blobs, uploads, torrents and the SQLite file (may be separate mounts)."""
    paths = [store.blobs_root, store.uploads_dir, store.torrents_dir]
    database = db.engine.url.database if db.engine.dialect.name == "sqlite" else None
    if database and database != ":memory:":
        paths.append(Path(database).parent)
    return paths
