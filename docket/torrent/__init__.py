"""BitTorrent plumbing: torf metainfo, the ctorrent process wrapper, opentracker and tracker queries.

Never imports Flask, click or docker: registry and client both build on this small public surface.
"""

from docket.torrent.ctorrent import CtorrentProcess, CtorrentStatus, find_ctorrent, parse_status_line
from docket.torrent.ctorrent_engine import CtorrentEngine
from docket.torrent.engine import TorrentEngine, TorrentStatus, Transfer
from docket.torrent.metainfo import PieceHasher, TorrentMeta, build_torrent, read_torrent
from docket.torrent.opentracker import Opentracker, find_opentracker
from docket.torrent.tracker import ScrapeResult, scrape

__all__ = [
    "CtorrentEngine",
    "CtorrentProcess",
    "CtorrentStatus",
    "Opentracker",
    "PieceHasher",
    "ScrapeResult",
    "TorrentEngine",
    "TorrentMeta",
    "TorrentStatus",
    "Transfer",
    "build_torrent",
    "find_ctorrent",
    "find_opentracker",
    "parse_status_line",
    "read_torrent",
    "scrape",
]
