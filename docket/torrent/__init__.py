"""BitTorrent plumbing: torf metainfo, the ctorrent process wrapper, opentracker and tracker queries.

Never imports Flask, click or docker: registry and client both build on this small public surface.
"""

import importlib
from typing import Any

# Imported on first use (PEP 562), so that a process needing one part (the client's background seeder: ctorrent
# and scrapes) does not pay for the others (opentracker, the tracker guard) at start-up.
_WHERE = {
    "CtorrentProcess": "ctorrent", "CtorrentStatus": "ctorrent", "find_ctorrent": "ctorrent",
    "parse_status_line": "ctorrent", "CtorrentEngine": "ctorrent_engine", "TorrentEngine": "engine",
    "TorrentStatus": "engine", "Transfer": "engine", "PieceHasher": "metainfo", "TorrentMeta": "metainfo",
    "build_torrent": "metainfo", "read_torrent": "metainfo", "Opentracker": "opentracker",
    "find_opentracker": "opentracker", "ScrapeResult": "tracker", "scrape": "tracker",
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'docket.torrent' has no attribute {name!r}")
    return getattr(importlib.import_module(f"docket.torrent.{_WHERE[name]}"), name)


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
