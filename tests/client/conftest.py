"""Fixtures of the client tests: the fakes of tests/support/fakes.py served on loopback, and a blob with its
canned record."""

from __future__ import annotations

import http.server
from collections.abc import Iterator
from pathlib import Path

import pytest

from docket.torrent.metainfo import build_torrent
from tests.support.fakes import (Canned, FakeCtorrent, FakeRegistry, QuietHTTPServer, canned_handler, make_record,
                                 serving)


@pytest.fixture
def canned() -> Iterator[Canned]:
    c = Canned()
    with serving(QuietHTTPServer(("127.0.0.1", 0), canned_handler(c))) as c.port:
        yield c


@pytest.fixture
def fake_registry() -> Iterator[FakeRegistry]:
    reg = FakeRegistry()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), reg.handler())
    server.daemon_threads = True
    with serving(server) as reg.port:
        yield reg


@pytest.fixture
def blob(tmp_path) -> tuple[Path, bytes]:
    data = bytes(range(256)) * 4000  # 1 MB
    p = tmp_path / "src" / "blob"
    p.parent.mkdir()
    p.write_bytes(data)
    return p, data


@pytest.fixture
def served(canned, tmp_path, blob) -> tuple[Canned, bytes, str]:
    path, data = blob
    meta = build_torrent(path, "http://127.0.0.1:6969/announce", out=tmp_path / "t.torrent")
    rec = make_record(canned, data, meta.info_hash)
    canned.json("GET", "/api/v1/repositories/team/app/tags/v1", 200, rec)
    canned.raw("GET", f"/api/v1/blobs/{rec['digest']}/torrent", 200, (tmp_path / "t.torrent").read_bytes())
    FakeCtorrent.instances.clear()
    return canned, data, rec["digest"]
