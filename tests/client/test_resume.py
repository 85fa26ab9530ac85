"""--max-download-rate reaches ctorrent as -D; bytes_resumed is read from ctorrent's saved bitfield."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from docket.client.api import RegistryClient
from docket.client.cli import cli
from docket.client.pull import PullOptions, Puller
from docket.client.pull_layers import bitfield_bytes
from docket.torrent.metainfo import TorrentMeta

META = TorrentMeta(info_hash="a" * 40, name="x.tar", length=10 * 256 * 1024 + 100, piece_length=256 * 1024,
                   pieces=11, announce="http://127.0.0.1:6969/announce")


def _puller(tmp_path: Path, **opts) -> tuple[Puller, list[dict]]:
    made: list[dict] = []
    puller = Puller(RegistryClient("127.0.0.1", 1), None, PullOptions(location=tmp_path, **opts),
                    ctorrent_factory=lambda **kw: made.append(kw) or kw)
    return puller, made


def test_max_download_rate_is_passed_to_ctorrent_as_D(tmp_path: Path):
    puller, made = _puller(tmp_path, max_download_rate=400)
    puller._new_ctorrent(torrent=tmp_path / "t.torrent")
    assert made[0]["extra_args"] == ["-D", "400"]
    puller, made = _puller(tmp_path)
    puller._new_ctorrent(torrent=tmp_path / "t.torrent")
    assert "extra_args" not in made[0]  # unlimited by default


def test_max_download_rate_option_and_env(monkeypatch):
    out = CliRunner().invoke(cli, ["pull", "--help"])
    assert "--max-download-rate" in out.output and "DOCKET_MAX_DOWNLOAD_RATE" in out.output
    bad = CliRunner().invoke(cli, ["pull", "--max-download-rate", "0", "x:y"])
    assert bad.exit_code == 2


def test_bitfield_bytes(tmp_path: Path):
    bf = tmp_path / "x.bf"
    assert bitfield_bytes(bf, META) is None  # no file: nothing known
    bf.write_bytes(bytes([0b1010_0000, 0b0000_0000]))  # pieces 0 and 2
    assert bitfield_bytes(bf, META) == 2 * 256 * 1024
    bf.write_bytes(bytes([0xFF, 0b1110_0000]))  # all 11 pieces: the last one is 100 bytes
    assert bitfield_bytes(bf, META) == META.length
    bf.write_bytes(b"\xff")  # wrong length for 11 pieces: not trusted
    assert bitfield_bytes(bf, META) is None
