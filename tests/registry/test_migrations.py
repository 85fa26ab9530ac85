"""Alembic migrations create exactly the schema the models describe, upgrading is idempotent, and tags pushed
before layer-level distribution (revision 0001: whole tarballs) are converted to layers at start-up."""

from __future__ import annotations

import hashlib
import tarfile
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from docket.registry.db import Database
from docket.registry.models import Base, Blob, utcnow
from docket.registry.store import FileBlobStore, LocationError
from docket.torrent import build_torrent, read_torrent
from tests.support.registry_images import build_image_tar

pytestmark = pytest.mark.databases("sqlite", "postgresql", empty=True)  # db_url: tests/conftest.py


def test_migration_matches_models(tmp_path: Path, db_url: str | None) -> None:
    db = Database(db_url or f"sqlite:///{tmp_path / 'docket.db'}")
    db.migrate()
    db.migrate()  # idempotent at head
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() == "0005"
        assert set(inspect(conn).get_table_names()) == {"alembic_version", "blobs", "images", "image_layers",
                                                       "manifests", "manifest_refs", "hosts", "registry_instances",
                                                       "upload_sessions", "blob_leases", "blob_damage"}
        if db_url is None:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    db.dispose()


def registry_at_0001(tmp_path: Path, db_url: str | None) -> tuple[Path, FileBlobStore, Path, dict, str]:
    """A location whose database (``db_url``, or SQLite in it) is at 0001 and holds one whole-tarball tag,
    team/old:v1 (as pushed before layers): (location, store, tarball, its image info, the tarball blob's digest)."""
    location = tmp_path / "registry"
    store = FileBlobStore(location)
    store.ensure_layout()
    tar = tmp_path / "old.tar"
    info = build_image_tar(tar, payload=b"pushed before layers")
    data = tar.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store.local_path(digest).write_bytes(data)
    meta = build_torrent(store.local_path(digest), "http://127.0.0.1:6999/announce",
                         out=store.torrents_dir / f"{digest[7:]}.torrent", name=f"{digest[7:]}.tar")
    old = Database(db_url or f"sqlite:///{location / 'docket.db'}")
    old.upgrade("0001")
    with old.engine.begin() as conn:
        conn.execute(text("INSERT INTO blobs (digest, size, info_hash, piece_length, created_at, unreferenced_at) "
                          "VALUES (:d, :n, :h, :p, '2026-01-02 03:04:05', NULL)"),
                     {"d": digest, "n": len(data), "h": meta.info_hash, "p": meta.piece_length})
        conn.execute(text("INSERT INTO images (repository, tag, image_id, created, size, blob_digest, pushed_at) "
                          "VALUES ('team/old', 'v1', :i, '2024-05-06 07:08:09', :n, :d, '2026-01-02 03:04:06')"),
                     {"i": info["image_id"], "n": len(data), "d": digest})
    old.dispose()
    return location, store, tar, info, digest


def test_tarball_image_at_0001_is_converted_to_layers(tmp_path: Path, make_app, db_url: str | None) -> None:
    """A registry at 0001 with a whole-tarball tag: upgraded to head, start-up splits the tarball (as a tarball PUT
    is split on arrival) and the tag is served as layers (same image, created and push time), with a V2 manifest;
    the tarball blob becomes unreferenced and GC takes it after the grace period."""
    location, store, tar, info, digest = registry_at_0001(tmp_path, db_url)
    app = make_app(location=location)
    sv = app.extensions["docket"]
    try:
        with sv.db.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == "0005"
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        client = app.test_client()
        rec = client.get("/api/v1/repositories/team/old/tags/v1").get_json()
        assert rec["format"] == "layers" and rec["image_id"] == info["image_id"] == rec["config"]["digest"]
        assert (rec["ref"], rec["created"], rec["pushed_at"]) == ("team/old:v1", "2024-05-06T07:08:09Z",
                                                                  "2026-01-02T03:04:06Z")
        layer_tar = tarfile.open(tar).extractfile([m for m in tarfile.open(tar).getnames() if m.endswith(".tar")][0])
        layer_bytes = layer_tar.read()
        assert [layer["digest"] for layer in rec["layers"]] == ["sha256:" + hashlib.sha256(layer_bytes).hexdigest()]
        with client.get(rec["layers"][0]["blob_url"]) as resp:
            assert resp.status_code == 200 and resp.data == layer_bytes
        with client.get(rec["layers"][0]["torrent_url"]) as resp:
            assert read_torrent(resp.data).info_hash == rec["layers"][0]["info_hash"]
        assert client.get("/api/v1/repositories/team/old/manifests/v1").status_code == 200
        assert client.get("/v2/team/old/manifests/v1").headers["Docker-Content-Digest"] == rec["digest"]
        assert [(r["ref"], r["format"]) for r in client.get("/api/v1/images").get_json()["images"]] == \
            [("team/old:v1", "layers")]
        with sv.db.session() as s:
            assert s.get(Blob, digest).unreferenced_at is not None  # the old tarball is now GC's
        assert sv.tarballs.migrate() == 0  # done once
        assert digest in sv.gc.run_once(now=utcnow() + timedelta(hours=1))
        assert not store.local_path(digest).exists()
        assert client.get("/api/v1/repositories/team/old/tags/v1").get_json() == rec
    finally:
        sv.db.dispose()


@pytest.mark.databases("sqlite", reason="the location's exclusive lock: on PostgreSQL instances share a location")
def test_tarball_records_are_not_converted_beside_a_serving_registry(tmp_path: Path, make_app) -> None:
    """The conversion writes blobs: while another registry holds the location's lock it refuses, with the same
    "in use" error a second registry gets, and converts nothing; the lock is let go after a conversion."""
    location, _, _, _, digest = registry_at_0001(tmp_path, None)
    serving = FileBlobStore(location)
    serving.lock()
    try:
        with pytest.raises(LocationError, match="in use by another docket-registry"):
            make_app(location=location)
        db = Database(f"sqlite:///{location / 'docket.db'}")
        with db.engine.connect() as conn:
            assert conn.execute(text("SELECT format, blob_digest FROM images")).all() == [("tarball", digest)]
        db.dispose()
        assert sorted(p.name for p in (location / "blobs" / "sha256").iterdir()) == [digest[7:]]
    finally:
        serving.unlock()
    client = make_app(location=location).test_client()
    assert client.get("/api/v1/repositories/team/old/tags/v1").get_json()["format"] == "layers"
    other = FileBlobStore(location)
    other.lock()  # let go after the conversion: the serve command's start() takes it for good
    other.unlock()
