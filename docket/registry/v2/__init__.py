"""The Docker Registry HTTP API V2 / OCI distribution API on the same store as /api/v1 (docs/v2.md).

``common.bp`` carries every /v2 route; ``blobs`` and ``manifests`` register theirs on it (the application
factory imports both). Stock clients (docker, skopeo, oras) push and pull here; layers of every image manifest
also get torrents and seeders, so ``docket pull`` gets the same images over BitTorrent.
"""
