"""Alembic migrations create exactly the schema the models describe, upgrading is idempotent, and tags pushed
before layer-level distribution (revision 0001: whole tarballs) keep being served after upgrading to 0002."""

from __future__ import annotations

import hashlib
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from docket.registry.db import Database
from docket.registry.models import Base, Blob
from docket.registry.store import BlobStore
from docket.torrent import build_torrent, read_torrent
from tests.support.registry_images import build_image_tar


def test_migration_matches_models(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'docket.db'}")
    db.migrate()
    db.migrate()  # idempotent at head
    with db.engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        ctx = MigrationContext.configure(conn)
        assert ctx.get_current_revision() == "0003"
        assert set(inspect(conn).get_table_names()) == {"alembic_version", "blobs", "images", "image_layers",
                                                       "manifests", "manifest_refs"}
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    db.dispose()


def test_tarball_image_at_0001_still_served_after_upgrade(tmp_path: Path, make_app) -> None:
    """A registry at 0001 with a whole-tarball tag: upgraded to head it serves the same record (plus
    ``format: tarball``), the blob and its torrent, seeds it (kind tarball), and lists it next to a layers image."""
    location = tmp_path / "registry"
    store = BlobStore(location)
    store.ensure_layout()
    tar = tmp_path / "old.tar"
    info = build_image_tar(tar, payload=b"pushed before layers")
    data = tar.read_bytes()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    store.blob_path(digest).write_bytes(data)
    meta = build_torrent(store.blob_path(digest), "http://127.0.0.1:6999/announce", out=store.torrent_path(digest),
                         name=f"{digest[7:]}.tar")
    url = f"sqlite:///{location / 'docket.db'}"
    old = Database(url)
    old.upgrade("0001")
    with old.engine.begin() as conn:
        conn.execute(text("INSERT INTO blobs (digest, size, info_hash, piece_length, created_at, unreferenced_at) "
                          "VALUES (:d, :n, :h, :p, '2026-01-02 03:04:05', NULL)"),
                     {"d": digest, "n": len(data), "h": meta.info_hash, "p": meta.piece_length})
        conn.execute(text("INSERT INTO images (repository, tag, image_id, created, size, blob_digest, pushed_at) "
                          "VALUES ('team/old', 'v1', :i, '2024-05-06 07:08:09', :n, :d, '2026-01-02 03:04:06')"),
                     {"i": info["image_id"], "n": len(data), "d": digest})
    old.dispose()

    app = make_app(location=location)
    sv = app.extensions["docket"]
    try:
        with sv.db.engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == "0003"
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
        client = app.test_client()
        expected = {
            "repository": "team/old", "tag": "v1", "ref": "team/old:v1", "image_id": info["image_id"],
            "created": "2024-05-06T07:08:09Z", "size": len(data), "digest": digest, "info_hash": meta.info_hash,
            "piece_length": meta.piece_length, "pushed_at": "2026-01-02T03:04:06Z",
            "torrent_url": f"/api/v1/blobs/{digest}/torrent", "blob_url": f"/api/v1/blobs/{digest}",
            "format": "tarball",
        }
        assert client.get("/api/v1/repositories/team/old/tags/v1").get_json() == expected
        with client.get(expected["blob_url"]) as resp:
            assert resp.status_code == 200 and resp.data == data
        head = client.head(expected["blob_url"])
        assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(data)
        with client.get(expected["torrent_url"]) as resp:
            assert read_torrent(resp.data).info_hash == meta.info_hash
        assert client.get("/api/v1/tracker/whitelist").data.decode() == meta.info_hash + "\n"
        assert client.get("/api/v1/repositories/team/old/manifests/v1").status_code == 404
        with sv.db.session() as s:
            blob = s.get(Blob, digest)
            assert blob.kind == "tarball" and blob.seeded
        assert [b.digest for b in sv.reconcile()] == [digest]  # start-up keeps it (and would seed it)
        # a layers image pushed next to it: both listed; the old tag can be replaced by a layers push
        new = tmp_path / "new.tar"
        build_image_tar(new, payload=b"pushed after layers")
        put = lambda ref: client.put(f"/api/v1/repositories/{ref.replace(':', '/tags/')}", data=new.read_bytes(),
                                     headers={"Content-Type": "application/x-tar"})
        assert put("team/new:v1").status_code == 201
        images = client.get("/api/v1/images").get_json()["images"]
        assert [(r["ref"], r["format"]) for r in images] == [("team/new:v1", "layers"), ("team/old:v1", "tarball")]
        assert images[1] == expected
        assert put("team/old:v1").get_json()["format"] == "layers"
        with sv.db.session() as s:
            assert s.get(Blob, digest).unreferenced_at is not None  # the old tarball is now GC's
    finally:
        sv.db.dispose()
