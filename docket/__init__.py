"""Docket: a Docker registry that deploys images through BitTorrent."""

__version__ = "0.1.0"
