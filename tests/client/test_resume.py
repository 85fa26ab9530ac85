"""--max-download-rate and --max-upload-rate take units; bytes_resumed is read from ctorrent's saved bitfield."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from docket.client.cli import cli
from docket.client.transfer import bitfield_bytes
from docket.torrent.ctorrent_engine import CtorrentEngine
from docket.torrent.metainfo import TorrentMeta

META = TorrentMeta(info_hash="a" * 40, name="x.tar", length=10 * 256 * 1024 + 100, piece_length=256 * 1024,
                   pieces=11, announce="http://127.0.0.1:6969/announce")


def test_rate_options_take_units_and_refuse_a_bare_number(monkeypatch):
    """The old --max-download-rate took KB/s: a bare number now fails with a hint instead of meaning bytes."""
    for command in ("pull", "agent"):
        out = CliRunner().invoke(cli, [command, "--help"])
        assert "--max-download-rate" in out.output and "DOCKET_MAX_DOWNLOAD_RATE" in out.output
        assert "--max-upload-rate" in out.output and "DOCKET_MAX_UPLOAD_RATE" in out.output
        bad = CliRunner().invoke(cli, [command, "--max-download-rate", "500", *(["x:y"] if command == "pull" else [])])
        assert bad.exit_code == 2 and "give a unit, e.g. 500KB" in bad.output
    monkeypatch.setenv("DOCKET_MAX_UPLOAD_RATE", "300")
    bad = CliRunner().invoke(cli, ["pull", "x:y"])
    assert bad.exit_code == 2 and "has no unit" in bad.output and "--max-upload-rate" in bad.output


def test_bitfield_bytes(tmp_path: Path):
    engine, torrent = CtorrentEngine(), tmp_path / "x.torrent"
    bf = tmp_path / "x.bf"  # ctorrent's: <workdir>/<torrent stem>.bf

    def saved() -> bytes | None:
        return engine.saved_pieces(tmp_path, torrent)
    assert bitfield_bytes(saved(), META) is None  # no file: nothing known
    bf.write_bytes(bytes([0b1010_0000, 0b0000_0000]))  # pieces 0 and 2
    assert bitfield_bytes(saved(), META) == 2 * 256 * 1024
    bf.write_bytes(bytes([0xFF, 0b1110_0000]))  # all 11 pieces: the last one is 100 bytes
    assert bitfield_bytes(saved(), META) == META.length
    bf.write_bytes(b"\xff")  # wrong length for 11 pieces: not trusted
    assert bitfield_bytes(saved(), META) is None
