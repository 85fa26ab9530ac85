"""docket.torrent: metainfo, ctorrent status parsing, and real opentracker + ctorrent processes on loopback."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
import torf

from docket.errors import IntegrityError, InvalidRequest, ServiceUnavailable
from docket.torrent import (
    CtorrentProcess,
    Opentracker,
    build_torrent,
    parse_status_line,
    read_torrent,
    scrape,
)
from docket.torrent.ctorrent_engine import PID_FILE, CtorrentEngine
from docket.torrent.metainfo import PieceHasher, choose_piece_size
from docket.torrent.tracker import BdecodeError, announce_ok, bdecode, scrape_url
from tests.support.procs import free_port, pid_gone, wait_until
from tests.support.tools import need

MiB = 1024 * 1024
# Loopback addresses for this module's ctorrents (never 127.0.0.1: see INTERFACE.md Findings).
SEED_IP, LEECH_IP, THIRD_IP = "127.0.0.61", "127.0.0.62", "127.0.0.63"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MiB), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Unit: status lines (captured from ctorrent dnh3.3.2 on this machine)

REAL_LINES = {
    "- 0/0/1 [80/80/80] 0MB,0MB | 0,0K/s | 0,0K E:0,0 Connecting": (0, 0, 1, 80, 80, 80, 0, 0, 0.0, 0.0, 0, 0),
    "\\ 0/0/2 [0/80/0] 0MB,0MB | 0,0K/s | 0,0K E:0,1": (0, 0, 2, 0, 80, 0, 0, 0, 0.0, 0.0, 0, 1),
    "\\ 0/1/3 [80/80/80] 20MB,0MB | 0,0K/s | 11056,0K E:0,1": (0, 1, 3, 80, 80, 80, 20, 0, 0.0, 0.0, 0, 1),
    "/ 0/0/4 [80/80/80] 20MB,20MB | 0,0K/s | 0,0K E:0,2": (0, 0, 4, 80, 80, 80, 20, 20, 0.0, 0.0, 0, 2),
    "| 0/0/1 [80/80/80] 0MB,0MB | 0,0K/s | 0,0K E:11,0 Connecting": (0, 0, 1, 80, 80, 80, 0, 0, 0.0, 0.0, 11, 0),
    "/ 1/0/2 [222/1024/1024] 444MB,0MB | 238703,0K/s | 0,0K E:0,1": (
        1, 0, 2, 222, 1024, 1024, 444, 0, 238703.0, 0.0, 0, 1),
}


@pytest.mark.parametrize("line", list(REAL_LINES))
def test_parse_status_line_real(line: str) -> None:
    s = parse_status_line(line)
    assert s is not None
    got = (s.seeds, s.leechers, s.swarm, s.have, s.total, s.available, s.downloaded_mb, s.uploaded_mb,
           s.down_kbps, s.up_kbps, s.tracker_failures, s.tracker_replies)
    assert got == REAL_LINES[line]
    assert s.fraction == pytest.approx(s.have / s.total)


@pytest.mark.parametrize("line", [
    "Listening on 127.0.0.3:7031",
    "Download complete.",
    "TRACKER FAILURE REASON: Requested download is not authorized for use with this tracker.",
    "-----> STOP NOW if you have not downloaded the whole torrent! <-----",
    "End of input reached.",
    "",
    "Already/Total: 3/80 (3%)",
])
def test_parse_status_line_other_output(line: str) -> None:
    assert parse_status_line(line) is None


def test_status_fraction_zero_total() -> None:
    s = parse_status_line("- 0/0/0 [0/0/0] 0MB,0MB | 0,0K/s | 0,0K E:0,0")
    assert s is not None and s.fraction == 0.0 and not s.complete


# ---------------------------------------------------------------------------------------------------------------
# Unit: metainfo

@pytest.mark.parametrize("length, expected", [
    (1, 64 * 1024),
    (128 * MiB, 64 * 1024),  # exactly 2048 pieces
    (128 * MiB + 1, 128 * 1024),
    (512 * MiB, 256 * 1024),  # exactly 2048 pieces
    (512 * MiB + 1, 512 * 1024),
    (1024 * MiB, 512 * 1024),
    (2048 * MiB, 1 * MiB),
    (8 * 1024 * MiB, 4 * MiB),
    (64 * 1024 * MiB, 4 * MiB),  # capped at ctorrent's limit even if > 2048 pieces
])
def test_choose_piece_size(length: int, expected: int) -> None:
    assert choose_piece_size(length) == expected


def test_build_and_read_torrent(tmp_path: Path) -> None:
    data = tmp_path / "blob"
    data.write_bytes(os.urandom(3 * MiB + 123))
    out = tmp_path / "t" / "blob.torrent"
    meta = build_torrent(data, "http://127.0.0.1:1/announce", out=out, name="sha256-abc")
    assert meta.piece_length == 64 * 1024 and meta.pieces == 49 and meta.length == 3 * MiB + 123
    assert meta.name == "sha256-abc" and meta.announce == "http://127.0.0.1:1/announce"
    assert len(meta.info_hash) == 40 and meta.info_hash == meta.info_hash.lower()
    assert read_torrent(out.read_bytes()) == meta
    t = torf.Torrent.read(out)
    assert t.created_by == "docket-registry" and not t.private and t.verify(data)
    assert not list(out.parent.glob(".tmp-*"))
    # Same content, same hash (no creation date): rebuilding is idempotent.
    again = build_torrent(data, "http://127.0.0.1:1/announce", out=tmp_path / "again.torrent", name="sha256-abc")
    assert again.info_hash == meta.info_hash


def test_build_torrent_explicit_piece_size(tmp_path: Path) -> None:
    data = tmp_path / "blob"
    data.write_bytes(b"x" * (MiB + 1))
    meta = build_torrent(data, "http://127.0.0.1:1/announce", out=tmp_path / "b.torrent", piece_size=MiB)
    assert meta.piece_length == MiB and meta.pieces == 2
    with pytest.raises(InvalidRequest):
        build_torrent(data, "http://127.0.0.1:1/announce", out=tmp_path / "c.torrent", piece_size=8 * MiB)
    with pytest.raises(InvalidRequest):
        build_torrent(data, "http://127.0.0.1:1/announce", out=tmp_path / "c.torrent", piece_size=300 * 1024)
    empty = tmp_path / "empty"
    empty.touch()
    with pytest.raises(InvalidRequest):
        build_torrent(empty, "http://127.0.0.1:1/announce", out=tmp_path / "e.torrent")


def _feed(h: PieceHasher, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        h.update(data[i:i + step])


@pytest.mark.parametrize("size", [1, 1000, 256 * 1024, 256 * 1024 + 1, 3 * MiB - 5, 5 * MiB + 7])
@pytest.mark.parametrize("expected", [True, False])
def test_piece_hasher_matches_build_torrent(tmp_path: Path, size: int, expected: bool) -> None:
    """Hashing while streaming gives the same .torrent bytes and info hash as build_torrent on the file."""
    data = os.urandom(size)
    blob = tmp_path / "blob"
    blob.write_bytes(data)
    url = "http://127.0.0.1:6969/announce"
    meta = build_torrent(blob, url, out=tmp_path / "a.torrent", name="abc.tar")
    h = PieceHasher(size if expected else None)
    _feed(h, data, 7777)  # chunks that straddle piece boundaries
    assert h.usable() and h.usable(size) and not h.usable(size + 1)
    streamed = h.write_torrent(url, out=tmp_path / "b.torrent", name="abc.tar")
    assert streamed == meta
    assert (tmp_path / "b.torrent").read_bytes() == (tmp_path / "a.torrent").read_bytes()
    assert read_torrent((tmp_path / "b.torrent").read_bytes()).info_hash == meta.info_hash
    h2 = PieceHasher(size)
    h2.update(memoryview(bytearray(data)))  # one big chunk, as a memoryview
    assert h2.pieces() == h.pieces()


def test_piece_hasher_piece_size_follows_the_length(tmp_path: Path) -> None:
    """Past 512 MiB the piece size doubles: right when the length was given, abandoned (fall back) when not."""
    size = 512 * MiB + 3
    blob = tmp_path / "sparse"
    with open(blob, "wb") as f:
        f.truncate(size)  # sparse: zeros without the disk space
    url = "http://127.0.0.1:6969/announce"
    meta = build_torrent(blob, url, out=tmp_path / "a.torrent", name="z.tar")
    assert meta.piece_length == 512 * 1024
    known, unknown, wrong = PieceHasher(size), PieceHasher(), PieceHasher(1000)
    zeros = bytes(8 * MiB)
    left = size
    while left:
        chunk = zeros[:min(left, len(zeros))]
        for h in (known, unknown, wrong):
            h.update(chunk)
        left -= len(chunk)
    assert known.usable() and known.write_torrent(url, out=tmp_path / "b.torrent", name="z.tar") == meta
    assert (tmp_path / "b.torrent").read_bytes() == (tmp_path / "a.torrent").read_bytes()
    assert unknown.abandoned and not unknown.usable() and wrong.abandoned and not wrong.usable()
    with pytest.raises(InvalidRequest):
        unknown.write_torrent(url, out=tmp_path / "c.torrent", name="z.tar")
    fixed = PieceHasher(piece_size=MiB)
    fixed.update(b"x" * (MiB + 1))
    assert fixed.usable() and fixed.torrent(url, "f").pieces == 2
    with pytest.raises(InvalidRequest):
        PieceHasher(piece_size=300 * 1024)
    assert not PieceHasher(10).usable()  # nothing fed


@pytest.mark.parametrize("data", [
    b"not bencode at all",
    b"d4:infod6:lengthi5eee",  # no pieces, no name
    b"i42e",
    b"le",
    b"d8:announce3:abce",  # no info
    b"d" * 100_000,  # deep nesting / truncated
    b"\x00" * 1000,
], ids=["text", "no-pieces", "int", "list", "no-info", "deep", "zeros"])
def test_read_torrent_garbage(data: bytes) -> None:
    with pytest.raises((IntegrityError, InvalidRequest)):
        read_torrent(data)


def test_read_torrent_empty_and_oversized() -> None:
    with pytest.raises(IntegrityError):
        read_torrent(b"")
    with pytest.raises(InvalidRequest):
        read_torrent(b"d" + b"x" * (4 * MiB) + b"e")


def test_read_torrent_rejects_truncated_and_multifile(tmp_path: Path) -> None:
    data = tmp_path / "blob"
    data.write_bytes(os.urandom(MiB))
    out = tmp_path / "blob.torrent"
    build_torrent(data, "http://127.0.0.1:1/announce", out=out)
    raw = out.read_bytes()
    with pytest.raises(IntegrityError):
        read_torrent(raw[:-10])
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a").write_bytes(b"a" * 1000)
    (tmp_path / "dir" / "b").write_bytes(b"b" * 1000)
    multi = torf.Torrent(tmp_path / "dir", trackers=["http://127.0.0.1:1/announce"])
    multi.generate()
    with pytest.raises(IntegrityError, match="single file"):
        read_torrent(multi.dump())
    no_announce = torf.Torrent(data)
    no_announce.generate()
    with pytest.raises(IntegrityError, match="announce"):
        read_torrent(no_announce.dump())


# ---------------------------------------------------------------------------------------------------------------
# Unit: bdecode and URLs

def test_bdecode_strict() -> None:
    assert bdecode(b"d5:filesd3:abcd8:completei1eeee") == {b"files": {b"abc": {b"complete": 1}}}
    assert bdecode(b"li-3ei0e0:e") == [-3, 0, b""]
    for bad in (b"i03e", b"i-0e", b"ie", b"3:ab", b"d1:ae", b"di1ei2ee", b"i1ei2e", b"x", b"", b"l" * 100 + b"e" * 100):
        with pytest.raises(BdecodeError):
            bdecode(bad)


def test_scrape_url() -> None:
    assert scrape_url("http://127.0.0.1:6969/announce") == "http://127.0.0.1:6969/scrape"
    assert scrape_url("http://h/x/announce.php?k=1") == "http://h/x/scrape.php?k=1"
    with pytest.raises(InvalidRequest):
        scrape_url("http://h/a")


# ---------------------------------------------------------------------------------------------------------------
# Real processes

def test_opentracker_whitelist_sighup_stop(tmp_path: Path, opentracker: Opentracker) -> None:
    h1, h2 = "1" * 40, "ab" * 20
    assert opentracker.alive() and opentracker.announce_url.endswith("/announce")
    assert not announce_ok(opentracker.announce_url, h1)
    opentracker.set_whitelist([h1])
    assert wait_until(lambda: announce_ok(opentracker.announce_url, h1), 5, 0.02, "h1 whitelisted")
    assert not announce_ok(opentracker.announce_url, h2)
    opentracker.set_whitelist([h2.upper()])  # normalised to lower case
    assert wait_until(lambda: announce_ok(opentracker.announce_url, h2), 5, 0.02, "h2 whitelisted")
    spaces = "20" * 20  # 0x20 bytes: sent as "+" (a plus to opentracker) they were never accepted
    opentracker.set_whitelist([h2, spaces])
    assert wait_until(lambda: announce_ok(opentracker.announce_url, spaces), 5, 0.02, "hash of 0x20 bytes")
    opentracker.set_whitelist([h2])
    assert wait_until(lambda: not announce_ok(opentracker.announce_url, h1), 5, 0.02, "h1 removed")
    opentracker.set_whitelist([])  # empty list must really remove (opentracker ignores empty files)
    assert wait_until(lambda: not announce_ok(opentracker.announce_url, h2), 5, 0.02, "h2 removed")
    assert (opentracker.workdir / "whitelist.txt").stat().st_mode & 0o444 == 0o444
    assert not list(opentracker.workdir.glob(".whitelist-*"))
    with pytest.raises(InvalidRequest):
        opentracker.set_whitelist(["not-a-hash"])
    assert scrape(opentracker.announce_url, h1) == (scrape(opentracker.announce_url, h1))  # unknown: zeros
    pid = opentracker.pid
    assert pid is not None
    opentracker.stop()
    opentracker.stop()  # idempotent
    assert not opentracker.alive() and wait_until(lambda: pid_gone(pid), 10, what="pid gone")
    with pytest.raises(ServiceUnavailable):
        scrape(opentracker.announce_url, h1, timeout=2)


def test_opentracker_port_busy(tmp_path: Path, opentracker: Opentracker) -> None:
    other = Opentracker("127.0.0.1", opentracker.port, tmp_path / "other")
    with pytest.raises(ServiceUnavailable):
        other.start(timeout=5)
    other.stop()
    assert other.pid is None or pid_gone(other.pid)


def test_seed_leech_transfer_scrape_and_stop(tmp_path: Path, opentracker: Opentracker, payload) -> None:
    need("ctorrent")
    data, torrent, meta = payload
    out = tmp_path / "leech" / "out.bin"
    seeder = CtorrentProcess(torrent, data, workdir=tmp_path / "seed", listen_ip=SEED_IP,
                             port=free_port(SEED_IP), seed_only=True, log_path=tmp_path / "seeder.log")
    leecher = CtorrentProcess(torrent, out, workdir=tmp_path / "leech", listen_ip=LEECH_IP,
                              port=free_port(LEECH_IP), log_path=tmp_path / "leecher.log")
    with seeder:
        assert seeder.wait_listening(10) == seeder.port
        assert seeder.bitfield.parent == tmp_path / "seed"
        wait_until(lambda: scrape(opentracker.announce_url, meta.info_hash).complete == 1, 20, 0.1, "seeder announced")
        with leecher:
            leecher.wait_listening(10)
            assert leecher.wait_complete(30), leecher.tail()
            assert sha256(out) == sha256(data)
            assert leecher.status is not None
            wait_until(lambda: leecher.status and leecher.status.have == leecher.status.total == meta.pieces, 10,
                       what="status shows all pieces")
            # ctorrent announces at most every ~15 s, so the tracker still counts the leecher as incomplete.
            assert scrape(opentracker.announce_url, meta.info_hash).incomplete == 1
            # A clean stop (the "stopped" announce) waits until ~15 s after the last announce: give it time.
            leecher.stop(timeout=20)
        assert not leecher.alive() and leecher.pid is not None and pid_gone(leecher.pid)
        assert any("Download complete." in line for line in leecher.tail(200))
        assert "Download complete." in (tmp_path / "leecher.log").read_text(errors="replace")
        sr = scrape(opentracker.announce_url, meta.info_hash)
        assert (sr.complete, sr.incomplete) == (1, 0)  # deregistered
        assert seeder.alive()
        # Status lines are event-driven (an idle seeder may print none for minutes): only the first is certain.
        assert seeder.status is not None and seeder.status.have == seeder.status.total == meta.pieces
        t0 = time.monotonic()
        seeder.stop(timeout=1)  # an idle seeder may ignore the first SIGTERM; the second one ends it
        assert time.monotonic() - t0 < 5
    assert not seeder.alive() and seeder.pid is not None and pid_gone(seeder.pid)
    assert seeder.returncode is not None
    seeder.stop()  # idempotent


def test_leecher_before_seeder(tmp_path: Path, opentracker: Opentracker, payload) -> None:
    """Order does not matter: the seeder's first announce returns the waiting leecher."""
    need("ctorrent")
    data, torrent, meta = payload
    out = tmp_path / "leech" / "out.bin"
    with CtorrentProcess(torrent, out, workdir=tmp_path / "leech", listen_ip=LEECH_IP) as leecher:
        leecher.wait_listening(10)
        wait_until(lambda: scrape(opentracker.announce_url, meta.info_hash).incomplete == 1, 20, 0.1, "leecher in")
        assert not leecher.completed.is_set()
        with CtorrentProcess(torrent, data, workdir=tmp_path / "seed", listen_ip=SEED_IP, seed_only=True) as seeder:
            seeder.wait_listening(10)
            assert leecher.wait_complete(30), leecher.tail()
            seeder.stop(timeout=0.5)  # fast stop: no need for a clean "stopped" announce here
        leecher.stop(timeout=0.5)
    assert sha256(out) == sha256(data)


def test_not_whitelisted_reports_tracker_failure(tmp_path: Path, opentracker: Opentracker, payload) -> None:
    need("ctorrent")
    data, torrent, meta = payload
    opentracker.set_whitelist([])
    with CtorrentProcess(torrent, data, workdir=tmp_path / "seed", listen_ip=THIRD_IP, seed_only=True) as seeder:
        wait_until(lambda: seeder.tracker_failure, 10, what="tracker failure line")
        assert "not authorized" in (seeder.tracker_failure or "")
        assert seeder.alive()  # ctorrent keeps retrying (every ~15 s)
        seeder.stop(timeout=0.5)


def test_stop_escalates_and_joins_reader(tmp_path: Path, opentracker: Opentracker, payload) -> None:
    """stop() of a seeding ctorrent from several threads at once: one stop, pid gone, reader joined."""
    need("ctorrent")
    data, torrent, _ = payload
    seeder = CtorrentProcess(torrent, data, workdir=tmp_path / "seed", listen_ip=SEED_IP, seed_only=True)
    seeder.start()
    seeder.wait_listening(10)
    wait_until(lambda: seeder.status is not None, 10, what="first status line")
    threads = [threading.Thread(target=seeder.stop, kwargs={"timeout": 0.5}) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not seeder.alive() and seeder.exited.is_set() and seeder.pid is not None and pid_gone(seeder.pid)
    assert seeder._reader is not None and not seeder._reader.is_alive()


def test_stop_escalates_to_sigkill(tmp_path: Path, opentracker: Opentracker, payload) -> None:
    """A just-completed leecher ignores SIGTERM for a while ("Quitting"): short timeouts escalate to SIGKILL."""
    need("ctorrent")
    data, torrent, _ = payload
    with CtorrentProcess(torrent, data, workdir=tmp_path / "seed", listen_ip=SEED_IP, seed_only=True) as seeder:
        seeder.wait_listening(10)
        leecher = CtorrentProcess(torrent, tmp_path / "out.bin", workdir=tmp_path / "leech", listen_ip=LEECH_IP)
        with leecher:
            assert leecher.wait_complete(30), leecher.tail()
            t0 = time.monotonic()
            leecher.stop(timeout=0.5)
            assert time.monotonic() - t0 < 5
        assert leecher.pid is not None and pid_gone(leecher.pid) and leecher.exited.is_set()
        assert leecher.returncode is not None
        seeder.stop(timeout=0.5)


def test_ctorrent_input_errors(tmp_path: Path) -> None:
    need("ctorrent")
    with pytest.raises(InvalidRequest):
        CtorrentProcess(tmp_path / "missing.torrent", tmp_path / "x", workdir=tmp_path).start()
    with pytest.raises(InvalidRequest):
        CtorrentProcess(tmp_path / "x.torrent", tmp_path / "x", workdir=tmp_path, listen_ip="not-an-ip")
    data = tmp_path / "d"
    data.write_bytes(b"x" * 1000)
    meta_path = tmp_path / "d.torrent"
    build_torrent(data, "http://127.0.0.1:1/announce", out=meta_path)
    with pytest.raises(InvalidRequest):  # seed_only needs the data on disk
        CtorrentProcess(meta_path, tmp_path / "absent", workdir=tmp_path, seed_only=True).start()


def test_reseed_replaces_a_finished_download_with_a_seeder(tmp_path: Path, opentracker: Opentracker,
                                                           payload) -> None:
    """reseed(): the old pid ends, a seeder takes its address and port (the tracker's entry turns complete), and it
    alone serves a later leecher once the original seeder is gone."""
    need("ctorrent")
    data, torrent, meta = payload
    out = tmp_path / "leech" / "out.bin"
    seeder = CtorrentProcess(torrent, data, workdir=tmp_path / "seed", listen_ip=SEED_IP, seed_only=True)
    leecher = CtorrentProcess(torrent, out, workdir=tmp_path / "leech", listen_ip=LEECH_IP,
                              log_path=tmp_path / "leecher.log")
    with seeder, leecher:
        seeder.wait_listening(10)
        port = leecher.wait_listening(10)
        with pytest.raises(RuntimeError):
            leecher.reseed()  # not finished yet: nothing to seed
        assert leecher.alive()
        assert leecher.wait_complete(30), leecher.tail()
        t0 = time.monotonic()
        replacement = leecher.reseed()
        elapsed = time.monotonic() - t0
        seeder.stop(timeout=0.5)
    with replacement:  # stopped whatever fails below
        assert elapsed < 5  # two SIGTERMs in a row: no wait for the tracker
        assert leecher.pid is not None and pid_gone(leecher.pid) and not leecher.alive()
        assert replacement.pid != leecher.pid and replacement.seed_only and "-f" in replacement.args()
        assert replacement.wait_listening(10) == port and replacement.listen_ip == LEECH_IP
        assert replacement.completed.is_set() and replacement.completed_at == leecher.completed_at
        with pytest.raises(RuntimeError):
            leecher.reseed()  # stopped: only once
        # the replacement announced the leecher's address and port as complete: no incomplete entry is left
        assert wait_until(lambda: (lambda r: r.incomplete == 0 and r.complete >= 1)(
            scrape(opentracker.announce_url, meta.info_hash)), 30, 0.2, "the leecher's entry turned complete")
        later = tmp_path / "later" / "out.bin"
        with CtorrentProcess(torrent, later, workdir=tmp_path / "later", listen_ip=THIRD_IP) as third:
            assert third.wait_complete(30), third.tail()
            third.stop(timeout=0.5)
        assert sha256(later) == sha256(data)
        replacement.stop(timeout=0.5)
    assert replacement.pid is not None and pid_gone(replacement.pid)
    assert (tmp_path / "leecher.log").read_text(errors="replace").count("Listening on") == 2  # one log, both runs


def test_ctorrent_engine_seeds_downloads_and_keeps_its_state_in_the_workdir(tmp_path: Path,
                                                                           opentracker: Opentracker,
                                                                           payload) -> None:
    """The TorrentEngine interface (engine.py) through CtorrentEngine: a seed and a download, both started, the
    pids recorded in their work directories, completion, the saved pieces, forget, stop_all, reap."""
    need("ctorrent")
    data, torrent, meta = payload
    engine = CtorrentEngine(tied=True)
    seed_dir, leech_dir = tmp_path / "seedw", tmp_path / "leechw"
    seed_dir.mkdir()
    leech_dir.mkdir()
    out = tmp_path / "out.bin"
    seeder = engine.seed(torrent, data, workdir=seed_dir, listen_ip=SEED_IP)
    try:
        assert seeder.completed.is_set() or seeder.alive()
        assert (seed_dir / PID_FILE).read_text().strip() == str(seeder.pid)
        seeder.wait_listening(10)
        leecher = engine.download(torrent, out, workdir=leech_dir, listen_ip=LEECH_IP, seed_hours=1,
                                  max_download_kbps=100_000)
        assert "-D" in leecher.args() and leecher.alive()  # type: ignore[attr-defined]
        assert leecher.completed.wait(30), leecher.tail()
        assert sha256(out) == sha256(data) and leecher.completed_at is not None
        leecher.stop(timeout=1)
        saved = engine.saved_pieces(leech_dir, torrent)
        assert saved is None or len(saved) == (meta.pieces + 7) // 8
        engine.forget(leech_dir)
        assert engine.saved_pieces(leech_dir, torrent) is None and not (leech_dir / PID_FILE).exists()
        # a live process whose keeper says "ours" is not reaped; without a keeper it is (its pid, its workdir)
        assert engine.reap(seed_dir, keep=lambda pid: True) is False and seeder.alive()
        assert engine.reap(seed_dir) is True
        wait_until(lambda: not seeder.alive(), 10, what="the reaped seeder gone")
    finally:
        engine.stop_all([seeder], 1.0)
    assert not seeder.alive()


def test_seeder_on_a_lan_address_takes_an_alias_for_itself(tmp_path: Path) -> None:
    """-I 127.0.0.2 for a non-loopback seeder (same-host pulls connect from its LAN address: INTERFACE.md)."""
    made: list[dict] = []

    class Made:
        pid = None

        def __init__(self, **kw: object) -> None:
            made.append(kw)

        def start(self) -> None:
            pass

    engine = CtorrentEngine(process_factory=Made)
    for ip in ("198.18.0.1", "127.0.0.2", None):
        engine.seed(tmp_path / "t.torrent", tmp_path / "blob", workdir=tmp_path, listen_ip=ip)
    engine.download(tmp_path / "t.torrent", tmp_path / "out", workdir=tmp_path, listen_ip="198.18.0.9")
    assert made[0]["extra_args"] == ["-I", "127.0.0.2"]
    assert all("extra_args" not in kw for kw in made[1:])
    argv = CtorrentProcess(tmp_path / "t.torrent", tmp_path / "blob", workdir=tmp_path, listen_ip="198.18.0.1",
                           seed_only=True, extra_args=made[0]["extra_args"]).args()
    assert argv[argv.index("-i") + 1] == "198.18.0.1" and argv[argv.index("-I") + 1] == "127.0.0.2"
