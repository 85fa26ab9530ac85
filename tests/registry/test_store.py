"""docket.registry.store.Upload: chunks hashed on a worker thread while the request thread writes the next ones."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from docket.registry.store import PIPELINE_MIN, FileBlobStore
from docket.torrent.metainfo import PieceHasher

MiB = 1024 * 1024


def chunks() -> list[bytes]:
    """Small chunks first (hashed inline), then big ones (the worker), then small ones again (still the worker)."""
    return [os.urandom(100), os.urandom(PIPELINE_MIN - 1), *(os.urandom(MiB) for _ in range(12)), os.urandom(7),
            os.urandom(PIPELINE_MIN + 3), b"x"]


def test_pipelined_upload_digest_pieces_and_file(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    store.ensure_layout()
    parts = chunks()
    data = b"".join(parts)
    expected = PieceHasher(len(data))
    expected.update(data)
    before = threading.active_count()
    with store.upload(pieces=True, expected_size=len(data)) as up:
        for i, part in enumerate(parts):
            up.write(part)
            hashing = any(t.name == "upload-hash" for t in threading.enumerate())
            assert hashing == (i >= 2), i  # inline until the first big chunk, then on the worker
        assert up.size == len(data)
        digest = up.finish()
        assert digest == "sha256:" + hashlib.sha256(data).hexdigest() == up.digest
        assert up.pieces is not None and up.pieces.usable() and up.pieces.pieces() == expected.pieces()
        assert up.path.read_bytes() == data
        assert threading.active_count() == before  # the worker ended with finish()
    assert not up.path.exists()  # not committed: removed


def test_pipelined_upload_session_hasher_is_whole_after_close(tmp_path: Path) -> None:
    """A V2 upload session keeps the hasher across requests: close() must leave every byte hashed into it."""
    store = FileBlobStore(tmp_path)
    store.ensure_layout()
    path = tmp_path / "uploads" / "session-x"
    path.write_bytes(b"")
    hasher = hashlib.sha256()
    total = b""
    for _ in range(2):  # two requests appending to one session
        up = store.reopen(path, len(total), hasher)
        for part in chunks():
            up.write(part)
            total += part
        up.close()
        assert hasher.hexdigest() == hashlib.sha256(total).hexdigest()
    assert path.read_bytes() == total


def test_pipelined_upload_hash_error_surfaces_and_discard_cleans_up(tmp_path: Path) -> None:
    store = FileBlobStore(tmp_path)
    store.ensure_layout()

    class Broken:
        def update(self, chunk: bytes) -> None:
            raise ValueError("piece hasher broke")

    before = threading.active_count()
    with pytest.raises(ValueError, match="piece hasher broke"):
        with store.upload() as up:
            up.pieces = Broken()  # type: ignore[assignment]
            for _ in range(3):
                up.write(os.urandom(MiB))
            up.finish()
    assert not up.path.exists() and threading.active_count() == before
