"""The swarm side of the registry: torrents of stored blobs, the tracker's whitelist and the seeders.

A seeded blob (layer, tarball) gets a ``torrents/<hex>.torrent`` built from the piece hashes computed while it was
uploaded (or from its file), its info hash on the whitelist before its seeder's first announce, and a seeder run
by the ``SeederSupervisor`` this component is given. Torrents are derived data: rebuilt from their blob when
missing, re-targeted when the announce URL or the read-token secret changes.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterable
from pathlib import Path

import torf

from docket.errors import DocketError, ServiceUnavailable
from docket.registry.auth import torrent_source
from docket.registry.models import Blob
from docket.registry.seeder import SeederSupervisor, SeedSpec, reap_orphans
from docket.registry.store import BlobStore, digest_hex
from docket.registry.tracker import ExternalTracker, ManagedTracker, Tracker
from docket.torrent import TorrentMeta, build_torrent, find_ctorrent
from docket.torrent.metainfo import PieceHasher, retarget_torrent
from docket.torrent.tracker import announce_ok

log = logging.getLogger(__name__)


class Swarm:
    def __init__(self, store: BlobStore, tracker: Tracker, seeders: SeederSupervisor | None, *, torrents_dir: Path,
                 seeders_dir: Path, hash_threads: int, secret: bytes | None = None) -> None:
        """``seeders`` None: P2P is disabled (torrents are still built, so clients can check them); ``secret``:
        with read tokens, each torrent's info dict gets a per-blob ``source`` nobody can compute from content."""
        self.store = store
        self.tracker = tracker
        self.seeders = seeders
        self.torrents_dir = torrents_dir
        self.seeders_dir = seeders_dir
        self.hash_threads = hash_threads
        self.secret = secret
        self.seeding = seeders is not None  # P2P on: GC asks the tracker whether peers still download a blob

    @property
    def announce_url(self) -> str:
        return self.tracker.announce_url

    # -- torrents -------------------------------------------------------------------------------------------
    def torrent_path(self, digest: str) -> Path:
        return self.torrents_dir / f"{digest_hex(digest)}.torrent"

    def _source(self, digest: str) -> str | None:
        return torrent_source(self.secret, digest) if self.secret is not None else None

    def build_torrent(self, digest: str, pieces: PieceHasher | None = None) -> TorrentMeta:
        """From the piece hashes computed while the upload streamed in when they fit the blob, else from the file."""
        name, out, source = f"{digest_hex(digest)}.tar", self.torrent_path(digest), self._source(digest)
        if pieces is not None and pieces.usable(self.store.stat(digest) or 0):
            return pieces.write_torrent(self.announce_url, out=out, name=name, source=source)
        return build_torrent(self.store.local_path(digest), self.announce_url, out=out, threads=self.hash_threads,
                             name=name, source=source)

    def ensure_torrent(self, blob: Blob, pieces: PieceHasher | None = None) -> bool:
        """Build the torrent of a seeded blob when it has none (caller holds the blob lock); True if the row
        changed."""
        if not blob.seeded or (blob.info_hash is not None and self.torrent_path(blob.digest).is_file()):
            return False
        meta = self.build_torrent(blob.digest, pieces)
        blob.info_hash, blob.piece_length = meta.info_hash, meta.piece_length
        return True

    def refresh_torrent(self, blob: Blob) -> bool:
        """Start-up: a missing torrent is rebuilt, an existing one re-targeted (the current announce URL, the
        secret's source; pieces kept). True when the row changed; OSError when it cannot be built."""
        path = self.torrent_path(blob.digest)
        if not path.is_file() or blob.info_hash is None:
            meta: TorrentMeta | None = self.build_torrent(blob.digest)
        else:
            try:
                meta = retarget_torrent(path, self.announce_url, self._source(blob.digest))
            except (torf.TorfError, OSError) as exc:
                log.error("cannot read torrent %s: %s", path, exc)
                return False
            if meta is not None:
                log.info("torrent %s now announces to %s", path.name, self.announce_url)
        if meta is None or meta.info_hash == blob.info_hash:
            return False
        if blob.info_hash is not None:
            log.info("blob %s: info hash %s -> %s", blob.digest, blob.info_hash, meta.info_hash)
        blob.info_hash, blob.piece_length = meta.info_hash, meta.piece_length
        return True

    def torrent_announce(self, digest: str) -> str | None:
        """The announce URL the blob's torrent carries (None: no torrent, or unreadable)."""
        try:
            t = torf.Torrent.read(self.torrent_path(digest))
        except (torf.TorfError, OSError):
            return None
        return t.trackers[0][0] if t.trackers and t.trackers[0] else None

    def torrent_current(self, blob: Blob) -> bool:
        """Whether ``refresh_torrent`` would leave the blob as it is (its torrent there, announcing to our tracker,
        with our source): read without a lock, so that a start-up beside other instances locks only what changes."""
        if blob.info_hash is None:
            return False
        try:
            t = torf.Torrent.read(self.torrent_path(blob.digest))
        except (torf.TorfError, OSError):
            return False
        source = self._source(blob.digest)
        return [list(tier) for tier in t.trackers] == [[self.announce_url]] and (source is None or t.source == source)

    def prune_torrents(self, known: set[str]) -> None:
        """Torrents of blobs without a row: derived data, rebuilt from the blob if it comes back."""
        for digest in self.unknown_torrents(known):
            self.torrent_path(digest).unlink(missing_ok=True)

    def unknown_torrents(self, known: set[str]) -> list[str]:
        """Digests of the torrents in ``torrents/`` not in ``known``."""
        found = []
        for torrent in self.torrents_dir.glob("*.torrent"):
            algorithm = "sha512" if len(torrent.stem) == 128 else "sha256"
            if f"{algorithm}:{torrent.stem}" not in known:
                found.append(f"{algorithm}:{torrent.stem}")
        return found

    def forget(self, digest: str) -> None:
        """A deleted blob's torrent and seeder directory."""
        with contextlib.suppress(FileNotFoundError):
            self.torrent_path(digest).unlink()
        shutil.rmtree(self.seeders_dir / digest_hex(digest), ignore_errors=True)

    # -- seeding --------------------------------------------------------------------------------------------
    def _spec(self, digest: str) -> SeedSpec:
        return SeedSpec(digest=digest, torrent=self.torrent_path(digest), blob=self.store.local_path(digest),
                        workdir=self.seeders_dir / digest_hex(digest))

    def seed(self, digest: str, info_hash: str) -> None:
        """Whitelist (before the seeder's first announce), then make sure a seeder runs; 503 when it cannot."""
        self.tracker.add(info_hash)
        if self.seeders is not None and not self.seeders.ensure(self._spec(digest)):
            error = self.seeders.snapshot().get(digest, {}).get("error")
            self.seeders.remove(digest)  # the blob row stays unreferenced: a retry re-seeds, GC reclaims
            raise ServiceUnavailable(f"could not start a seeder for {digest}: {error or 'ctorrent failed'}",
                                     "see the registry log; the push can be retried")

    def reseed(self, digest: str, info_hash: str) -> None:
        """Seed again without waiting (a blob GC or the scrubber kept after all)."""
        self.tracker.add(info_hash)
        if self.seeders is not None:
            self.seeders.ensure(self._spec(digest), wait_listening=0)

    def unseed(self, digest: str, info_hash: str | None) -> None:
        """Stop the seeder and take the hash off the whitelist (a blob going away, or found corrupt)."""
        if self.seeders is not None:
            self.seeders.remove(digest)
        if info_hash is not None:
            self.tracker.discard(info_hash)

    def settle(self, seeds: list[tuple[str, str]]) -> None:
        """External tracker: before a tag is visible, wait (bounded) until the tracker accepts these layers, and
        restart the seeders it does not list: they announced while it still refused them (docket-tracker polls
        every few seconds) and would retry only ~15 s later, while the first pulls found no seeder."""
        if not isinstance(self.tracker, ExternalTracker) or self.seeders is None or not seeds:
            return
        unseeded = set(self.tracker.settle(h for _, h in seeds))
        late = [digest for digest, info_hash in seeds if info_hash in unseeded]
        if late:
            log.info("re-announcing %d seeder(s) the tracker refused before it accepted their hashes", len(late))
            self.seeders.reannounce(late)

    def tracker_accepts(self, info_hash: str) -> bool:
        """Whether a seeder of ``info_hash`` started now would be accepted by the tracker: an external one refuses
        a hash until its sync job (docket-tracker) has polled the whitelist, and a refused ctorrent retries only
        ~15 s later. True for the managed tracker (whitelisted before any seeder starts) and when the tracker
        cannot be reached (``needs_restart`` re-announces every seeder when it is back)."""
        if not isinstance(self.tracker, ExternalTracker):
            return True
        try:
            return announce_ok(self.announce_url, info_hash, 2.0)
        except ServiceUnavailable:
            return True
        except Exception:  # noqa: BLE001 - an odd answer: asked again at the next sync
            return False

    def busy(self, info_hash: str) -> str | None:
        """Why the swarm still needs our seeder (peers downloading; unknown, as when the tracker is down, counts
        as busy), or None."""
        if not self.seeding:
            return None  # no swarm: P2P is disabled in this registry
        try:
            result = self.tracker.scrape(info_hash)
        except DocketError as exc:
            return f"an unknown swarm (cannot scrape the tracker: {exc.message})"
        return f"{result.incomplete} downloading peer(s)" if result.incomplete else None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Fail early, with the install hint, when a tool seeding needs is missing."""
        if self.seeders is not None:
            find_ctorrent()
            if isinstance(self.tracker, ManagedTracker):
                self.tracker.preflight()

    def start(self, seeds: Iterable[tuple[str, str]]) -> None:
        """Tracker with the full whitelist, then a seeder per stored (digest, info hash)."""
        seeds = list(seeds)
        if self.seeders is not None:
            reap_orphans(self.seeders_dir)
        self.tracker.start([h for _, h in seeds])
        if self.seeders is not None:
            for digest, _ in seeds:
                if self.store.stat(digest) is not None:
                    self.seeders.ensure(self._spec(digest), wait_listening=0)
            self.seeders.start()

    def stop(self) -> None:
        if self.seeders is not None:
            self.seeders.stop()
        self.tracker.stop()

    def snapshot(self) -> dict[str, dict]:
        return self.seeders.snapshot() if self.seeders is not None else {}
