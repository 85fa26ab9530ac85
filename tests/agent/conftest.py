"""Fixtures of the agent tests: an ``AgentStore`` on a temporary location and a helper that puts blobs in it the
way a download (or a ``docket pull`` of the same location) leaves them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from docket.agent.store import AgentStore


@pytest.fixture
def store(tmp_path: Path) -> AgentStore:
    return AgentStore(tmp_path / "cache", max_bytes=1 << 30)


@pytest.fixture
def put_blob(store: AgentStore) -> Callable[..., str]:
    """``put_blob(data, mark=True)``: write ``blobs/<hex>`` and its workdir (what a finished download leaves);
    ``mark``: record it verified, as the fetcher does once the digest matched."""

    def put(data: bytes, mark: bool = True) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        store.blob_path(digest).write_bytes(data)
        store.workdir(digest)  # created, as the pull engine's blob_lock does
        if mark:
            store.mark_verified(digest)
        return digest

    return put
