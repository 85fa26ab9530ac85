"""--max-download-rate reaches ctorrent as -D; bytes_resumed is read from ctorrent's saved bitfield."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from docket.client.cli import cli
from docket.client.transfer import bitfield_bytes
from docket.torrent.ctorrent_engine import CtorrentEngine
from docket.torrent.metainfo import TorrentMeta

META = TorrentMeta(info_hash="a" * 40, name="x.tar", length=10 * 256 * 1024 + 100, piece_length=256 * 1024,
                   pieces=11, announce="http://127.0.0.1:6969/announce")


class _Made:
    def __init__(self, made: list[dict], **kw) -> None:
        made.append(kw)

    def start(self) -> None:
        pass


def test_max_download_rate_is_passed_to_ctorrent_as_D(tmp_path: Path):
    made: list[dict] = []
    engine = CtorrentEngine(process_factory=lambda **kw: _Made(made, **kw))
    engine.download(tmp_path / "t.torrent", tmp_path / "blob", workdir=tmp_path, max_download_kbps=400)
    assert made[0]["extra_args"] == ["-D", "400"]
    engine.download(tmp_path / "t.torrent", tmp_path / "blob", workdir=tmp_path)
    assert "extra_args" not in made[1]  # unlimited by default


def test_max_download_rate_option_and_env(monkeypatch):
    out = CliRunner().invoke(cli, ["pull", "--help"])
    assert "--max-download-rate" in out.output and "DOCKET_MAX_DOWNLOAD_RATE" in out.output
    bad = CliRunner().invoke(cli, ["pull", "--max-download-rate", "0", "x:y"])
    assert bad.exit_code == 2


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
