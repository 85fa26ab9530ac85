"""``GET /metrics`` of the registry: Prometheus text made by prometheus_client from one ``CollectorRegistry`` per
app (README "Metrics" lists every name).

Two kinds of numbers:

- counted at the HTTP edge as requests pass (prometheus ``Counter`` objects here): requests and their latency
  (``docket.metrics_http``), pushes and their body bytes (``bodies.receive`` calls ``received``), pulls and the
  size of the images pulled, blob bytes sent over HTTP (``bodies.send_blob`` calls ``sending_blob``);
- read from the components when Prometheus scrapes (``ComponentsCollector``): blobs stored (one grouped query),
  seeders, the tracker's swarm totals (cached, bounded: ``swarm_totals.py``), GC, scrub, upload sessions and
  retention. The components keep plain counters (``stats``) and import nothing of Prometheus.

A read token guards ``/metrics`` where read tokens are configured (``TokenAuth``: it is not one of the open
paths); elsewhere it is open, like the other reads.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from flask import Blueprint, Flask, Response, current_app, request
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from docket.metrics_http import PULL_HELP, RequestMetrics, count_body, exposition, pulled_bytes
from docket.registry.components import Components
from docket.registry.models import KIND_BLOB, KIND_CONFIG, KIND_LAYER, KIND_MANIFEST, KIND_TARBALL, Blob, utcnow
from docket.registry.swarm_totals import SwarmTotals

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

# the views that commit a tag (Manifests.commit) and answer 201 when they did
PUSH_ENDPOINTS = frozenset({"api.push", "api.put_manifest", "v2.put_manifest"})
MiB = 1024 * 1024
KINDS = (KIND_LAYER, KIND_CONFIG, KIND_MANIFEST, KIND_TARBALL, KIND_BLOB)


def api_of(path: str) -> str:
    return "v2" if path.startswith("/v2/") else "v1"


class RegistryMetrics:
    """The app's metrics: install with ``init_app`` (the application factory does)."""

    def __init__(self, components: Components) -> None:
        self.registry = CollectorRegistry()
        self.http = RequestMetrics(self.registry)
        r = self.registry
        self.pushes = Counter("docket_pushes", "Pushes: a manifest PUT (/v2 or docket's) or whole-tarball PUT that "
                              "tagged an image (201; a /v2 PUT by digest without ?tag= is none)", ["api"], registry=r)
        self.push_bytes = Counter("docket_push_bytes", "Bytes of blob and tarball bodies received whole by pushes",
                                  ["api"], registry=r)
        self.pulls = Counter("docket_pulls", f"Pulls: {PULL_HELP}", ["api"], registry=r)
        self.pull_bytes = Counter("docket_pull_bytes", "Size (config and layers) of the images pulled, as their "
                                  "manifest or record states it, whichever way the bytes then travel", ["api"],
                                  registry=r)
        self.blob_sent = Counter("docket_http_blob_sent_bytes", "Blob bytes the registry sent over HTTP (GET of "
                                 "/api/v1/blobs/<digest> or /v2/<name>/blobs/<digest>)", ["api"], registry=r)
        for counter in (self.pushes, self.push_bytes, self.pulls, self.pull_bytes, self.blob_sent):
            for api in ("v1", "v2"):
                counter.labels(api)  # every series from 0 on: rate() and increase() see the first one
        r.register(ComponentsCollector(components, SwarmTotals(components.db, components.swarm)))

    def init_app(self, app: Flask) -> None:
        app.extensions["docket_metrics"] = self
        self.http.init_app(app)
        app.after_request(self._account)
        app.register_blueprint(bp)

    # -- called by the edges --------------------------------------------------------------------------------
    def received(self, nbytes: int) -> None:
        """A push's body arrived whole (``bodies.receive``)."""
        self.push_bytes.labels(api_of(request.path)).inc(nbytes)

    def sending_blob(self, resp: Response) -> None:
        """A blob's body is about to be sent (``bodies.send_blob``): its bytes are counted as they go."""
        count_body(resp, self.blob_sent.labels(api_of(request.path)).inc)

    def _account(self, resp: Response) -> Response:
        api = api_of(request.path)
        if request.endpoint in PUSH_ENDPOINTS:
            if resp.status_code == 201 and _tags_something():
                self.pushes.labels(api).inc()
            return resp
        size = pulled_bytes(resp)
        if size is not None:
            self.pulls.labels(api).inc()
            self.pull_bytes.labels(api).inc(size)
        return resp


def _tags_something() -> bool:
    """Whether the PUT names a tag: a /v2 manifest PUT by digest (a platform's manifest before its index, an
    artifact) moves none and is no push of its own."""
    if request.endpoint != "v2.put_manifest":
        return True
    reference = (request.view_args or {}).get("reference", "")
    return ":" not in reference or bool(request.args.getlist("tag"))


class ComponentsCollector(Collector):
    """What the components hold, read at each scrape (cheap: one grouped query, in-memory counters, the tracker
    totals cached by ``SwarmTotals``)."""

    def __init__(self, components: Components, swarm_totals: SwarmTotals) -> None:
        self.sv = components
        self.swarm_totals = swarm_totals

    def collect(self) -> Iterator[Metric]:
        yield from self._blobs()
        yield from self._seeders()
        yield from self._swarm()
        yield from self._housekeeping()

    def _blobs(self) -> Iterator[Metric]:
        try:
            with self.sv.db.session() as s:
                rows = list(s.execute(select(Blob.kind, func.count(), func.coalesce(func.sum(Blob.size), 0))
                                      .group_by(Blob.kind)))
        except Exception as exc:  # noqa: BLE001 - a scrape reports what it can; the database has /healthz
            log.warning("metrics: cannot count blobs: %s", exc)
            return
        found = {kind: (n, total) for kind, n, total in rows}
        count = GaugeMetricFamily("docket_blobs_stored", "Blobs stored, by kind (layer, config, manifest, tarball; "
                                  "blob: pushed through /v2 and no layer, such as a /v2 image's config)",
                                  labels=["kind"])
        size = GaugeMetricFamily("docket_blobs_stored_bytes", "Bytes of the blobs stored, by kind", labels=["kind"])
        for kind in sorted(set(KINDS) | set(found)):  # every kind from 0 on
            n, total = found.get(kind, (0, 0))
            count.add_metric([kind], n)
            size.add_metric([kind], total)
        yield count
        yield size

    def _seeders(self) -> Iterator[Metric]:
        supervisor = self.sv.swarm.seeders
        if supervisor is None:
            return  # seeding disabled: no seeders to speak of
        snap = supervisor.snapshot()
        yield GaugeMetricFamily("docket_seeders_running", "Seeders running (one per seeded blob)",
                                value=sum(1 for s in snap.values() if s["alive"]))
        yield CounterMetricFamily("docket_seeder_restarts", "Seeders started again (died, tracker restarted, "
                                  "re-announced)", value=supervisor.stats.restarts)
        yield GaugeMetricFamily("docket_seeder_uploaded_bytes", "Bytes the running seeders report uploaded to "
                                "peers (a gauge: a seeder started again counts from 0; MiB resolution; ctorrent's "
                                "status output arrives in blocks, so it can lag a minute or two)",
                                value=sum((s.get("uploaded_mb") or 0) for s in snap.values()) * MiB)

    def _swarm(self) -> Iterator[Metric]:
        counts = self.swarm_totals.current()
        if counts is None:
            return  # no swarm (seeding disabled)
        yield GaugeMetricFamily("docket_tracker_up", "1 when the tracker answered the last scrape of every stored "
                                "torrent (cached 10 s), else 0 and the swarm totals are left out",
                                value=int(counts.up))
        if not counts.up:
            return
        yield GaugeMetricFamily("docket_swarm_torrents", "Stored torrents the tracker was asked about",
                                value=counts.torrents)
        peers = GaugeMetricFamily("docket_swarm_peers", "Peers of every stored torrent in total as the tracker "
                                  "reports them: state seed (whole blob, our seeders included) or downloading",
                                  labels=["state"])
        peers.add_metric(["seed"], counts.seeds)
        peers.add_metric(["downloading"], counts.downloading)
        yield peers
        yield GaugeMetricFamily("docket_swarm_completed_downloads", "Completed downloads of the stored torrents "
                                "the tracker counted (since it started)", value=counts.downloaded)

    def _instances(self) -> Iterator[Metric]:
        """The registry instances sharing the database (docs/instances.md) and whether this one leads."""
        me = self.sv.instances
        yield GaugeMetricFamily("docket_registry_leader", "1 when this instance leads (runs GC, retention and the "
                                "scrubber; always on SQLite), else 0", value=int(me.is_leader()))
        try:
            rows = me.listing()
        except Exception as exc:  # noqa: BLE001 - as _blobs
            log.warning("metrics: cannot list the registry instances: %s", exc)
            return
        now = utcnow()
        live = sum(1 for r in rows if r.seen_at >= now - me.live_for or r.id == me.id)
        family = GaugeMetricFamily("docket_registry_instances", "Registry instances on this database: live (a "
                                   "heartbeat within the last 15 s) or dead (rows are kept a day)", labels=["state"])
        family.add_metric(["live"], live)
        family.add_metric(["dead"], len(rows) - live)
        yield family

    def _housekeeping(self) -> Iterator[Metric]:
        sv = self.sv
        yield CounterMetricFamily("docket_gc_runs", "Garbage collection passes", value=sv.gc.stats.runs)
        yield CounterMetricFamily("docket_gc_blobs_removed", "Blobs garbage collection deleted",
                                  value=sv.gc.stats.blobs_removed)
        yield CounterMetricFamily("docket_scrub_runs", "Scrub passes (every blob re-hashed)",
                                  value=sv.scrubber.passes)
        try:
            corrupt = len(sv.scrubber.damaged())
        except Exception as exc:  # noqa: BLE001 - as _blobs (the marks are rows: docs/instances.md)
            log.warning("metrics: cannot count damaged blobs: %s", exc)
        else:
            yield GaugeMetricFamily("docket_scrub_corrupt_blobs", "Blobs the scrubber found corrupt or missing (not "
                                    "served or seeded until repaired)", value=corrupt)
        yield from self._instances()
        yield GaugeMetricFamily("docket_upload_sessions_open", "/v2 upload sessions open", value=len(sv.uploads))
        try:
            states = sv.hosts.states()
        except Exception as exc:  # noqa: BLE001 - as _blobs: the rest of the scrape still answers
            log.warning("metrics: cannot count hosts: %s", exc)
        else:
            hosts = GaugeMetricFamily("docket_hosts", "Hosts whose docket agent reported within a day, by state (ok; "
                                      "silent: missed three heartbeats)", labels=["state"])
            for state, n in sorted(states.items()):
                hosts.add_metric([state], n)
            yield hosts
        stats = sv.retention.stats
        yield CounterMetricFamily("docket_retention_runs", "Retention policy passes that removed what the policy "
                                  "says (dry runs not counted)", value=stats.runs)
        yield CounterMetricFamily("docket_retention_tags_removed", "Tags the retention policy removed",
                                  value=stats.tags_removed)


@bp.get("/metrics")
def metrics() -> Response:
    return exposition(current_app.extensions["docket_metrics"].registry)
