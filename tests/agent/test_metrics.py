"""The agent's /metrics in-process (docket/agent/metrics.py) around a real AgentStore and a stand-in for the
registry and the downloads: cache hits and misses, the bytes sent, evictions, downloads by result. The real agent
process behind a real registry is in tests/e2e/test_metrics.py."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from docket.agent.app import create_app
from docket.agent.fetcher import FetchTotals, Outcome
from docket.agent.store import AgentStore
from docket.agent.upstream import Answer

DATA = b"layer bytes " * 10_000
DIGEST = "sha256:" + hashlib.sha256(DATA).hexdigest()


class SizedRegistry:
    url = "http://127.0.0.1:1"

    def request(self, method: str, path: str, **kw: Any) -> Answer:
        return Answer(200, {"Content-Length": str(len(DATA))})


@dataclass
class Downloads:
    """The fetcher's surface: a download writes DATA and marks it verified; totals as fetcher.py keeps them."""

    store: AgentStore
    totals: FetchTotals = field(default_factory=FetchTotals)

    def get(self, digest: str, size: int, authorization: str | None, timeout: float) -> None:
        self.store.workdir(digest)
        self.store.blob_path(digest).write_bytes(DATA)
        self.store.mark_verified(digest)
        self.totals.downloads += 1
        self.totals.bytes_from_peers += len(DATA) - 100
        self.totals.bytes_from_http += 100

    def totals_now(self) -> FetchTotals:
        return self.totals


@dataclass
class FakeAgent:
    store: AgentStore
    fetcher: Downloads
    upstream: SizedRegistry = field(default_factory=SizedRegistry)
    config: Any = field(default_factory=lambda: type("C", (), {"blob_timeout": 30.0})())
    seeder: Any = field(default_factory=lambda: type("S", (), {"seeding": {}})())
    counters: dict[str, int] = field(default_factory=lambda: {"manifests_fetched": 2, "manifests_cached": 1})
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def served(self, digest: str, nbytes: int) -> None:
        pass

    def count(self, key: str, n: int = 1) -> None:
        pass

    def counted(self) -> dict[str, int]:
        return dict(self.counters)


def scrape(client) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics")
    assert resp.status_code == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.get_data(as_text=True)) for s in family.samples}


def test_blobs_served_split_by_cache_hit_and_the_parts_read_at_scrape(tmp_path):
    store = AgentStore(tmp_path / "cache", max_bytes=1 << 30)
    agent = FakeAgent(store, Downloads(store))
    client = create_app(agent).test_client()
    for _ in range(3):  # a miss (downloaded for the request), then two hits
        got = client.get(f"/v2/team/app/blobs/{DIGEST}")
        assert got.status_code == 200 and got.data == DATA
        got.close()
    part = client.get(f"/v2/other/name/blobs/{DIGEST}", headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and len(part.data) == 10
    part.close()
    samples = scrape(client)

    def v(name: str, **labels: str) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert v("docket_agent_blobs_served_total", cache="miss") == 1
    assert v("docket_agent_blobs_served_total", cache="hit") == 3
    assert v("docket_agent_blob_sent_bytes_total", cache="miss") == len(DATA)
    assert v("docket_agent_blob_sent_bytes_total", cache="hit") == 2 * len(DATA) + 10
    assert v("docket_agent_downloads_total", result="ok") == 1
    assert v("docket_agent_download_bytes_total", source="peers") == len(DATA) - 100
    assert v("docket_agent_download_bytes_total", source="registry") == 100
    assert v("docket_agent_manifests_served_total", source="registry") == 2
    assert v("docket_agent_blobs_held") == 1
    assert v("docket_agent_cache_bytes") >= len(DATA)
    assert v("docket_agent_cache_limit_bytes") == 1 << 30
    assert v("docket_agent_evictions_total") == 0
    blob_rule = "/v2/<path:name>/blobs/<digest>"
    assert v("docket_http_requests_total", method="GET", route=blob_rule, status="200") == 3  # one label, two names
    assert v("docket_http_requests_total", method="GET", route=blob_rule, status="206") == 1

    store.max_bytes = 0
    assert store.evict(lambda digests: None) == [DIGEST]
    samples = scrape(client)
    assert v("docket_agent_evictions_total") == 1 and v("docket_agent_evicted_bytes_total") >= len(DATA)
    assert v("docket_agent_blobs_held") == 0 and v("docket_agent_cache_bytes") == 0


def test_fetch_totals_count_every_download_past_the_kept_outcomes(tmp_path):
    """``Fetcher.outcomes`` keeps the last 1000; the totals /metrics reads keep counting."""
    from docket.agent.fetcher import Fetcher

    fetcher = Fetcher(AgentStore(tmp_path / "cache", 1 << 20), None, None, peer_ip=None)  # type: ignore[arg-type]
    for i in range(1005):
        fetcher._total(Outcome(f"sha256:{i:064x}", 10, via="p2p", bytes_from_peers=10))
    fetcher._total(Outcome("sha256:" + "f" * 64, 10, via="failed", bytes_from_http=4))
    fetcher._total(Outcome("sha256:" + "e" * 64, 10, via="cached"))
    totals = fetcher.totals_now()
    assert (totals.downloads, totals.failed, totals.bytes_from_peers, totals.bytes_from_http) == (1005, 1, 10050, 4)
