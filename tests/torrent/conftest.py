"""Fixtures of the torrent area: a real opentracker on a free loopback port, and a whitelisted payload."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from docket.torrent import Opentracker, build_torrent
from tests.support.procs import free_port, pid_gone, wait_until
from tests.support.tools import need

MiB = 1024 * 1024


@pytest.fixture
def opentracker(tmp_path: Path):
    need("opentracker")
    ot = Opentracker("127.0.0.1", free_port(), tmp_path / "tracker", admin_ip="127.0.0.1",
                     log_path=tmp_path / "tracker.log")
    ot.start()
    try:
        yield ot
    finally:
        ot.stop()
        assert ot.pid is not None and wait_until(lambda: pid_gone(ot.pid), 10, what="opentracker gone")


@pytest.fixture
def payload(tmp_path: Path, opentracker: Opentracker):
    """4 MiB of random bytes, its torrent (64 KiB pieces so there are many), whitelisted."""
    data = tmp_path / "seed" / "payload.bin"
    data.parent.mkdir()
    data.write_bytes(os.urandom(4 * MiB))
    torrent = tmp_path / "payload.torrent"
    meta = build_torrent(data, opentracker.announce_url, out=torrent, piece_size=64 * 1024)
    opentracker.set_whitelist([meta.info_hash])
    return data, torrent, meta
