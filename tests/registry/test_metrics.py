"""The registry's /metrics in-process (docket/registry/metrics.py, docket/metrics_http.py): what each counter
counts, bounded route labels, the components read at scrape time, and who may scrape. The real registry process
with dockerd, ctorrent and opentracker is in tests/e2e/test_metrics.py."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from docket.registry.metrics import ComponentsCollector
from docket.registry.seeder import SeederSupervisor, SeedSpec
from docket.registry.swarm_totals import SwarmTotals
from docket.torrent.engine import TorrentStatus

PUSH_TOKEN, READ_TOKEN = "push-token-0123456789", "read-token-0123456789"
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
LAYER_V2 = "application/vnd.docker.image.rootfs.diff.tar"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def parse(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample as {(name, sorted labels): value}, parsed by prometheus_client's parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(client: FlaskClient, **headers: str) -> dict[tuple[str, tuple], float]:
    resp = client.get("/metrics", headers=headers)
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    return parse(resp.get_data(as_text=True))


def value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def routes(samples: dict, name: str = "docket_http_requests_total") -> dict[tuple, float]:
    return {labels: v for (n, labels), v in samples.items() if n == name}


def config_for(layers: list[bytes]) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux", "created": "2025-01-02T03:04:05Z",
                       "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]}}, sort_keys=True).encode()


def push_v1(client: FlaskClient, ref: str, layers: list[bytes]) -> bytes:
    """What `docket push` sends: each layer, the config, then the manifest."""
    config = config_for(layers)
    for data, kind in [*((x, "layer") for x in layers), (config, "config")]:
        resp = client.post(f"/api/v1/blobs?kind={kind}&digest={sha(data)}", data=data,
                           headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code in (200, 201), resp.get_data(as_text=True)
    repo, _, tag = ref.rpartition(":")
    resp = client.put(f"/api/v1/repositories/{repo}/manifests/{tag}",
                      json={"config": sha(config), "layers": [sha(x) for x in layers]})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return config


def push_v2(client: FlaskClient, name: str, tag: str, layers: list[bytes]) -> bytes:
    """What docker sends: monolithic blob uploads, then a schema 2 manifest."""
    config = config_for(layers)
    for data in [*layers, config]:
        resp = client.post(f"/v2/{name}/blobs/uploads/?digest={sha(data)}", data=data,
                           headers={"Content-Type": "application/octet-stream"})
        assert resp.status_code == 201, resp.get_data(as_text=True)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_V2,
                           "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                                      "size": len(config), "digest": sha(config)},
                           "layers": [{"mediaType": LAYER_V2, "size": len(x), "digest": sha(x)} for x in layers]})
    by_digest = client.put(f"/v2/{name}/manifests/{sha(manifest.encode())}", data=manifest,
                           headers={"Content-Type": MANIFEST_V2})  # stored untagged first: no push yet
    assert by_digest.status_code == 201, by_digest.get_data(as_text=True)
    resp = client.put(f"/v2/{name}/manifests/{tag}", data=manifest, headers={"Content-Type": MANIFEST_V2})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return config


def test_route_labels_are_rules_never_names_tags_or_digests(app: Flask, client: FlaskClient):
    for name in ("team/app", "other", "a/b/c"):
        assert client.get(f"/v2/{name}/manifests/v{len(name)}").status_code == 404
        assert client.get(f"/v2/{name}/blobs/sha256:{'ab' * 32}").status_code == 404
    assert client.get("/no/such/thing").status_code == 404
    assert client.open("/v2/", method="BREW").status_code == 405
    samples = scrape(client)
    seen = routes(samples)
    manifest_rule, blob_rule = "/v2/<path:name>/manifests/<reference>", "/v2/<path:name>/blobs/<digest>"
    assert seen[(("method", "GET"), ("route", manifest_rule), ("status", "404"))] == 3
    assert seen[(("method", "GET"), ("route", blob_rule), ("status", "404"))] == 3
    assert seen[(("method", "GET"), ("route", "unmatched"), ("status", "404"))] == 1
    assert seen[(("method", "other"), ("route", "unmatched"), ("status", "405"))] == 1
    for labels in seen:
        route = dict(labels)["route"]
        assert route == "unmatched" or route.startswith("/"), labels
        assert not any(x in route for x in ("team", "other", "a/b/c", "ab" * 32)), labels
    assert value(samples, "docket_http_request_duration_seconds_count", method="GET", route=manifest_rule) == 3


def test_a_view_that_raises_counts_as_the_500_it_became(make_app):
    app = make_app()

    def boom() -> str:
        raise RuntimeError("a bug")

    app.add_url_rule("/boom", "boom", boom)
    client = app.test_client()
    assert client.get("/boom").status_code == 500
    assert value(scrape(client), "docket_http_requests_total", method="GET", route="/boom", status="500") == 1


def test_pushes_pulls_and_their_bytes_by_api(app: Flask, client: FlaskClient):
    v1_layers, v2_layers = [b"v1 layer " * 1000, b"shared " * 300], [b"v2 layer " * 2000]
    v1_config = push_v1(client, "team/app:v1", v1_layers)
    v2_config = push_v2(client, "team/web", "v2", v2_layers)
    v1_size = len(v1_config) + sum(map(len, v1_layers))
    v2_size = len(v2_config) + sum(map(len, v2_layers))

    assert client.get("/api/v1/repositories/team/app/tags/v1").status_code == 200  # docket pull's first request
    got = client.get("/v2/team/web/manifests/v2", headers={"Accept": MANIFEST_V2})  # docker pull's
    assert got.status_code == 200
    assert client.head("/v2/team/web/manifests/v2").status_code == 200  # a HEAD is not a pull
    again = client.get("/v2/team/web/manifests/v2", headers={"If-None-Match": got.headers["ETag"]})
    assert again.status_code == 304  # nor a 304
    blob = client.get(f"/api/v1/blobs/{sha(v1_layers[0])}")
    assert blob.data == v1_layers[0]
    blob.close()  # the server closes the body once sent: the bytes are counted by then
    ranged = client.get(f"/v2/team/web/blobs/{sha(v2_layers[0])}", headers={"Range": "bytes=0-99"})
    assert ranged.status_code == 206 and len(ranged.data) == 100
    ranged.close()

    samples = scrape(client)
    assert value(samples, "docket_pushes_total", api="v1") == 1
    assert value(samples, "docket_pushes_total", api="v2") == 1
    assert value(samples, "docket_push_bytes_total", api="v1") == v1_size
    assert value(samples, "docket_push_bytes_total", api="v2") == v2_size
    assert value(samples, "docket_pulls_total", api="v1") == 1
    assert value(samples, "docket_pulls_total", api="v2") == 1
    assert value(samples, "docket_pull_bytes_total", api="v1") == v1_size
    assert value(samples, "docket_pull_bytes_total", api="v2") == v2_size
    assert value(samples, "docket_http_blob_sent_bytes_total", api="v1") == len(v1_layers[0])
    assert value(samples, "docket_http_blob_sent_bytes_total", api="v2") == 100
    # blobs stored, from the database at scrape time: 2 + 1 layers, 2 configs, the 2 manifests docket keeps
    stored = {dict(labels)["kind"]: v for labels, v in routes(samples, "docket_blobs_stored").items()}
    assert stored["layer"] == 3 and stored["manifest"] == 2 and sum(stored.values()) == 7, stored
    assert value(samples, "docket_blobs_stored_bytes", kind="layer") == sum(map(len, v1_layers + v2_layers))


def test_a_refused_push_is_no_push(client: FlaskClient):
    resp = client.put("/api/v1/repositories/team/app/manifests/v1",
                      json={"config": sha(b"nothing"), "layers": [sha(b"nothing either")]})
    assert resp.status_code == 404
    assert value(scrape(client), "docket_pushes_total", api="v1") == 0


def test_components_are_read_at_scrape_time(app: Flask, client: FlaskClient):
    sv = app.extensions["docket"]
    samples = scrape(client)
    assert value(samples, "docket_upload_sessions_open") == 0
    assert value(samples, "docket_blobs_stored", kind="layer") == 0  # every kind from 0 on, even when empty
    assert value(samples, "docket_retention_runs_total") == 0  # no policy: no pass yet, still exported
    assert value(samples, "docket_hosts", state="ok") == 0
    assert not any(n.startswith(("docket_seeder", "docket_tracker", "docket_swarm")) for n, _ in samples)  # no P2P

    push_v1(client, "team/app:v1", [b"layer " * 100])
    assert client.post("/v2/team/app/blobs/uploads/").status_code == 202
    assert client.delete("/api/v1/repositories/team/app/tags/v1").status_code == 204
    sv.gc.run_once()
    layer = sv.store.local_path(sha(b"layer " * 100))
    layer.chmod(0o644)
    layer.write_bytes(b"rot " * 150)  # same size, other bytes
    sv.scrubber.run_once()

    sv.retention.stats.runs, sv.retention.stats.tags_removed = 2, 5  # as two passes of docket/registry/retention.py
    samples = scrape(client)
    assert value(samples, "docket_upload_sessions_open") == 1
    assert value(samples, "docket_gc_runs_total") == 1
    assert value(samples, "docket_gc_blobs_removed_total") == 0  # still in its grace period
    assert value(samples, "docket_scrub_runs_total") == 1
    assert value(samples, "docket_scrub_corrupt_blobs") == 1
    assert value(samples, "docket_retention_runs_total") == 2
    assert value(samples, "docket_retention_tags_removed_total") == 5


@pytest.mark.registry_config(auth_tokens=(PUSH_TOKEN,), read_tokens=(READ_TOKEN,))
def test_read_tokens_guard_metrics(client: FlaskClient):
    refused = client.get("/metrics")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer ")
    assert b"docket_" not in refused.data
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong-token-0000"}).status_code == 401
    for token in (READ_TOKEN, PUSH_TOKEN):
        samples = scrape(client, Authorization=f"Bearer {token}")
        assert value(samples, "docket_http_requests_total", method="GET", route="/metrics", status="401") == 2


@pytest.mark.registry_config(auth_tokens=(PUSH_TOKEN,))
def test_without_read_tokens_metrics_is_open_like_every_read(client: FlaskClient):
    assert "docket_pushes_total" in {n for n, _ in scrape(client)}


# -- the tracker's totals: cached, bounded ----------------------------------------------------------------------

@dataclass
class Tracker:
    up: bool = False

    def alive(self) -> bool:
        return self.up


@dataclass
class SwarmStub:
    """What SwarmTotals reads of the Swarm: whether it seeds, the announce URL, the tracker."""

    announce_url: str
    seeding: bool = True
    tracker: Tracker = field(default_factory=Tracker)
    seeders: SeederSupervisor | None = None


def _with_a_torrent(app: Flask) -> None:
    from docket.registry.models import Blob

    with app.extensions["docket"].db.session() as s:
        s.add(Blob(digest=sha(b"x"), size=1, kind="layer", info_hash="ab" * 20, piece_length=65536))
        s.commit()


def _totals(app: Flask, swarm: SwarmStub, **kw) -> SwarmTotals:
    return SwarmTotals(app.extensions["docket"].db, swarm, **kw)  # type: ignore[arg-type]


@pytest.fixture
def silent_tracker() -> Iterator[str]:
    """The announce URL of a tracker that takes connections (the kernel does) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/announce"
    finally:
        sock.close()


def test_a_silent_tracker_costs_one_bounded_scrape_per_ttl(app: Flask, silent_tracker: str):
    _with_a_torrent(app)
    now = [0.0]
    totals = _totals(app, SwarmStub(silent_tracker), ttl=10, deadline=0.5, clock=lambda: now[0])
    t0 = time.monotonic()
    first = totals.current()
    assert time.monotonic() - t0 < 3
    assert first is not None and first.up is False and first.torrents == 1
    t0 = time.monotonic()
    assert totals.current() is first and time.monotonic() - t0 < 0.1  # cached: no second wait
    now[0] = 11.0
    assert totals.current() is not first  # asked again after the ttl


def test_no_swarm_no_totals_and_an_empty_one_says_whether_the_tracker_runs(app: Flask):
    assert _totals(app, SwarmStub("http://127.0.0.1:9/announce", seeding=False)).current() is None
    counts = _totals(app, SwarmStub("http://127.0.0.1:9/announce", tracker=Tracker(up=True))).current()
    assert counts is not None and counts.up and counts.torrents == 0


def test_one_refresh_at_a_time(app: Flask, silent_tracker: str):
    """A scrape arriving while another refreshes gets the last totals instead of asking the tracker again."""
    _with_a_torrent(app)
    totals = _totals(app, SwarmStub(silent_tracker), deadline=1.0)
    slow = threading.Thread(target=totals.current)
    slow.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    assert totals.current() is None  # nothing known yet, and nobody waits for the slow refresh
    assert time.monotonic() - t0 < 0.2
    slow.join(5)
    assert not slow.is_alive()


# -- the seeders, as the supervisor holds them -----------------------------------------------------------------

class Seeding:
    """A seeding transfer as the engine returns it, with the status ctorrent last printed."""

    def __init__(self, uploaded_mb: int) -> None:
        self.pid, self.listen_port, self.running = 4242, 7000, True
        self.status = TorrentStatus(0, 1, 1, 4, 4, 4, 0, uploaded_mb, 0.0, 0.0)

    def alive(self) -> bool:
        return self.running

    def wait_listening(self, timeout: float) -> int:
        return 7000

    def stop(self, timeout: float = 5.0) -> None:
        self.running = False


class Engine:
    """Seeds with 3 MiB, then 5 MiB uploaded (the BitTorrent engine of docket/torrent/engine.py, seeding only)."""

    def __init__(self) -> None:
        self.uploads = iter([3, 5, 0, 0])

    def seed(self, torrent, blob, **kw) -> Seeding:
        return Seeding(next(self.uploads))

    def forget(self, workdir) -> None:
        pass


def test_seeders_running_restarted_and_their_uploads(app: Flask, tmp_path):
    sv = app.extensions["docket"]
    supervisor = SeederSupervisor(listen_ip="127.0.0.2", engine=Engine())  # type: ignore[arg-type]
    for n in (1, 2):
        spec = SeedSpec(f"sha256:{n:064x}", tmp_path / f"{n}.torrent", tmp_path / f"{n}", tmp_path / f"seeder-{n}")
        assert supervisor.ensure(spec, wait_listening=0)
    swarm = SwarmStub("http://127.0.0.1:9/announce", seeding=False, seeders=supervisor)
    registry = CollectorRegistry()
    registry.register(ComponentsCollector(dataclasses.replace(sv, swarm=swarm), _totals(app, swarm)))
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "docket_seeders_running") == 2
    assert value(samples, "docket_seeder_uploaded_bytes") == (3 + 5) * 2**20
    assert value(samples, "docket_seeder_restarts_total") == 0
    supervisor.restart_all()  # as after a tracker restart: each counts from 0 again
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "docket_seeder_restarts_total") == 2
    assert value(samples, "docket_seeder_uploaded_bytes") == 0
    supervisor.stop()
