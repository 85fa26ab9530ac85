"""The agent's /v2 edge (docket/agent/app.py) in-process, around a real AgentStore and stand-ins for the registry
and the downloads: what is hashed when, and what a client gets while a download runs. The real registry and
processes are in tests/e2e/test_agent.py and tests/e2e/test_agent_hostile.py."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from docket.agent import store as store_module
from docket.agent.app import create_app
from docket.agent.store import AgentStore
from docket.agent.upstream import Answer
from tests.support.procs import wait_until

DATA = b"layer bytes " * 10_000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class SizedRegistry:
    """Every blob HEAD: 200 with DATA's size."""

    url = "http://127.0.0.1:1"

    def request(self, method: str, path: str, **kw: Any) -> Answer:
        return Answer(200, {"Content-Length": str(len(DATA))})


@dataclass
class Downloads:
    """The fetcher: one download per digest, shared (as fetcher.py's); it writes DATA and marks it once
    ``release`` is set (a download that takes a while)."""

    store: AgentStore
    release: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    _first: threading.Lock = field(default_factory=threading.Lock)

    def get(self, digest: str, size: int, authorization: str | None, timeout: float) -> None:
        self.calls += 1
        if not self._first.acquire(blocking=False):
            assert self.done.wait(10)  # a download runs: wait for it
            return
        with self.store.busy(digest):
            (self.store.workdir(digest) / "lock").touch()  # blob_lock's file: the workdir exists
            self.store.blob_path(digest).write_bytes(b"\0" * size)  # ctorrent's file: full length, not yet written
            self.started.set()
            assert self.release.wait(10)
            self.store.blob_path(digest).write_bytes(DATA)
            self.store.mark_verified(digest)
        self.done.set()


@dataclass
class FakeAgent:
    store: AgentStore
    upstream: SizedRegistry = field(default_factory=SizedRegistry)
    config: Any = field(default_factory=lambda: type("C", (), {"blob_timeout": 30.0})())
    served_bytes: int = 0
    fetcher: Any = None

    def served(self, digest: str, nbytes: int) -> None:
        self.served_bytes += nbytes

    def count(self, key: str, n: int = 1) -> None:
        pass


@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Every whole-file hash the store does."""
    seen: list[str] = []
    real = store_module.digest_file

    def counting(path, algorithm):
        seen.append(path.name)
        return real(path, algorithm)

    monkeypatch.setattr(store_module, "digest_file", counting)
    return seen


def test_a_blob_is_downloaded_once_then_served_from_its_record_without_hashing(store, hashes):
    agent = FakeAgent(store)
    agent.fetcher = Downloads(store)
    agent.fetcher.release.set()
    client = create_app(agent).test_client()
    for _ in range(3):
        got = client.get(f"/v2/team/app/blobs/{DIGEST}")
        assert got.status_code == 200 and got.data == DATA
        assert got.headers["Docker-Content-Digest"] == DIGEST
        got.close()  # what the WSGI server does once the body is sent
    assert agent.fetcher.calls == 1 and hashes == []  # the record vouches for it: no hash per request
    assert agent.served_bytes == 3 * len(DATA)
    assert not store.in_use(DIGEST)  # every response released its reader


def test_a_client_arriving_during_a_download_does_not_hash_the_half_written_file(store, hashes):
    agent = FakeAgent(store)
    agent.fetcher = Downloads(store)
    app = create_app(agent)
    first: dict[str, Any] = {}
    t = threading.Thread(target=lambda: first.setdefault("r", app.test_client().get(f"/v2/team/app/blobs/{DIGEST}")))
    t.start()
    assert agent.fetcher.started.wait(10)
    second: dict[str, Any] = {}
    t2 = threading.Thread(target=lambda: second.setdefault("r", app.test_client().get(f"/v2/team/app/blobs/{DIGEST}")))
    t2.start()
    wait_until(lambda: agent.fetcher.calls == 2, timeout=10, what="the second request to join the download")
    agent.fetcher.release.set()
    t.join(10)
    t2.join(10)
    assert first["r"].status_code == 200 and first["r"].data == DATA
    assert second["r"].status_code == 200 and second["r"].data == DATA
    for r in (first["r"], second["r"]):
        r.close()
    assert hashes == [], "a request hashed the file a download was still writing"
    assert not store.in_use(DIGEST) and agent.fetcher.calls == 2
