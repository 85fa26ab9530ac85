"""docket.torrent: metainfo, ctorrent and opentracker processes."""
