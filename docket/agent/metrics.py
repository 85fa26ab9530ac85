"""``GET /metrics`` of ``docket agent``: Prometheus text from one ``CollectorRegistry`` per app.

Counted as requests pass (the edge, app.py): requests and latency (``docket.metrics_http``, shared with the
registry), pulls served and their image sizes, blobs and blob bytes sent to local clients, split by whether the
blob was already in the cache when asked (``cache="hit"``: bytes from the cache) or had to be downloaded first.
Read at each scrape from the parts (``AgentCollector``): manifests by source, downloads and their bytes from
peers and from the registry, the cache's size and blobs, evictions, seeding and what the seeds uploaded. The
parts keep plain counters and import nothing of Prometheus. The agent has no tokens of its own: like its /v2,
/metrics is for whoever reaches its listen address (loopback by default).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from flask import Flask, Response
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from docket.metrics_http import RequestMetrics, count_body, exposition, pulled_bytes

MiB = 1024 * 1024
CACHE_STATES = ("hit", "miss")


class AgentMetrics:
    """The agent app's metrics: ``init_app`` installs the hooks and ``GET /metrics``."""

    def __init__(self, agent: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = RequestMetrics(r)
        self.pulls = Counter("docket_agent_pulls", "Pulls served to local clients: a GET answered 200 with an "
                             "image manifest (not an index)", registry=r)
        self.pull_bytes = Counter("docket_agent_pull_bytes", "Size (config and layers) of the images pulled "
                                  "through the agent, as their manifests state it", registry=r)
        self.blobs_served = Counter("docket_agent_blobs_served", "Blob GETs answered with the blob; cache=hit: "
                                    "held before the request, miss: downloaded for it", ["cache"], registry=r)
        self.blob_bytes = Counter("docket_agent_blob_sent_bytes", "Blob bytes sent to local clients; cache=hit: "
                                  "bytes from the cache", ["cache"], registry=r)
        for state in CACHE_STATES:
            self.blobs_served.labels(state)
            self.blob_bytes.labels(state)
        r.register(AgentCollector(agent))

    def init_app(self, app: Flask) -> None:
        app.extensions["docket_agent_metrics"] = self
        self.http.init_app(app)
        app.after_request(self._account)
        app.add_url_rule("/metrics", "metrics", lambda: exposition(self.registry), methods=["GET"])

    def sending_blob(self, resp: Response, *, hit: bool) -> None:
        state = "hit" if hit else "miss"
        self.blobs_served.labels(state).inc()
        count_body(resp, self.blob_bytes.labels(state).inc)

    def _account(self, resp: Response) -> Response:
        size = pulled_bytes(resp)
        if size is not None:
            self.pulls.inc()
            self.pull_bytes.inc(size)
        return resp


class AgentCollector(Collector):
    """The agent's parts as they are at scrape time (the cache's size is one directory scan)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        agent = self.agent
        counters = agent.counted()
        manifests = CounterMetricFamily("docket_agent_manifests_served", "Manifests served to local clients: "
                                        "source registry (fetched) or cache (by digest, kept on disk)",
                                        labels=["source"])
        manifests.add_metric(["registry"], counters.get("manifests_fetched", 0))
        manifests.add_metric(["cache"], counters.get("manifests_cached", 0))
        yield manifests

        totals = agent.fetcher.totals_now()
        downloads = CounterMetricFamily("docket_agent_downloads", "Blob downloads (one per digest however many "
                                        "clients asked), by result", labels=["result"])
        downloads.add_metric(["ok"], totals.downloads)
        downloads.add_metric(["failed"], totals.failed)
        yield downloads
        got = CounterMetricFamily("docket_agent_download_bytes", "Bytes downloaded, by source: peers (BitTorrent) "
                                  "or registry (HTTP)", labels=["source"])
        got.add_metric(["peers"], totals.bytes_from_peers)
        got.add_metric(["registry"], totals.bytes_from_http)
        yield got

        store = agent.store
        yield GaugeMetricFamily("docket_agent_cache_bytes", "Disk space the cached blobs take",
                                value=store.usage())
        yield GaugeMetricFamily("docket_agent_cache_limit_bytes", "--cache-size", value=store.max_bytes)
        yield GaugeMetricFamily("docket_agent_blobs_held", "Verified blobs in the cache", value=len(store.held()))
        yield CounterMetricFamily("docket_agent_evictions", "Blobs evicted (least recently used first)",
                                  value=store.stats.evictions)
        yield CounterMetricFamily("docket_agent_evicted_bytes", "Disk space evictions freed",
                                  value=store.stats.evicted_bytes)

        seeding = list(agent.seeder.seeding.values())
        yield GaugeMetricFamily("docket_agent_seeding", "Blobs the agent seeds", value=len(seeding))
        uploaded = sum((s.transfer.status.uploaded_mb if s.transfer.status else 0) for s in seeding)
        yield GaugeMetricFamily("docket_agent_seed_uploaded_bytes", "Bytes the seeds report uploaded to peers (a "
                                "gauge: a blob seeded again counts from 0; MiB resolution)", value=uploaded * MiB)
