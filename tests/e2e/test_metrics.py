"""/metrics with real parts: a registry process (cheroot, its opentracker and ctorrent seeders), dockerd, the
docket CLI and a `docket agent` process. Scraped with requests, parsed with prometheus_client's parser, and
checked against what was done: one push, one pull, one blob fetched twice through the agent, one manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.support.agent import AgentProcess
from tests.support.procs import free_port, wait_until
from tests.support.registry_server import RegistryServer
from tests.support.tools import need

MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"
PUSH, READ = "push-token-metrics-0123456789", "read-token-metrics-0123456789"

Samples = dict[tuple[str, tuple], float]


def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = requests.get(f"{url}/metrics", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


def test_counters_move_with_a_push_a_pull_and_an_agent(registry_server, image_factory, docket_cli, tmp_path: Path):
    registry = registry_server
    ref, _ = image_factory.build(data_mib=2)
    docket_cli("push", ref, registry=registry)
    record = next(r for r in requests.get(f"{registry.url}/api/v1/images", timeout=10).json()["images"]
                  if r["ref"] == ref)
    layers = {x["digest"]: x["size"] for x in record["layers"]}
    image_bytes = record["config"]["size"] + sum(x["size"] for x in record["layers"])
    image_factory.remove(ref)
    docket_cli("pull", ref, "--seed-time", "0", registry=registry, peer_ip="127.0.61.1")

    samples = scrape(registry.url)
    assert value(samples, "docket_pushes_total", api="v1") == 1
    assert value(samples, "docket_push_bytes_total", api="v1") >= sum(layers.values())
    assert value(samples, "docket_pulls_total", api="v1") == 1  # the image record docket pull asked for
    assert value(samples, "docket_pull_bytes_total", api="v1") == image_bytes
    assert value(samples, "docket_http_blob_sent_bytes_total", api="v1") >= record["config"]["size"]
    assert value(samples, "docket_http_requests_total", route="/api/v1/blobs/<digest>", method="GET",
                 status="200") > 0
    stored = by_label(samples, "docket_blobs_stored", "kind")
    distinct = {*layers, record["config"]["digest"], record["manifest_digest"]}
    assert sum(stored.values()) == len(distinct), stored
    assert value(samples, "docket_blobs_stored_bytes", kind="layer") == sum(layers.values())
    assert value(samples, "docket_seeders_running") == len(layers)
    assert value(samples, "docket_tracker_up") == 1
    assert value(samples, "docket_swarm_torrents") == len(layers)
    assert value(samples, "docket_swarm_peers", state="seed") >= len(layers)  # the registry's seeders at least
    assert value(samples, "docket_upload_sessions_open") == 0
    routes = set(by_label(samples, "docket_http_requests_total", "route"))
    assert not any(ref.split(":")[0] in r or "sha256:" in r for r in routes), routes

    need("ctorrent")
    digest = max(layers, key=layers.__getitem__)
    repo, tag = ref.split(":")
    with AgentProcess(registry.url, tmp_path / "agent", free_port(), tmp_path / "agent.log",
                      peer_ip="127.0.61.2") as agent:
        for _ in range(2):  # downloaded for the first request, from the cache for the second
            got = requests.get(f"{agent.url}/v2/{repo}/blobs/{digest}", timeout=120)
            assert got.status_code == 200 and "sha256:" + hashlib.sha256(got.content).hexdigest() == digest
        manifest = requests.get(f"{agent.url}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT},
                                timeout=30)
        assert manifest.status_code == 200
        assert json.loads(manifest.content)["config"]["digest"] == record["config"]["digest"]

        seen = scrape(agent.url)
        assert value(seen, "docket_agent_blobs_served_total", cache="miss") == 1
        assert value(seen, "docket_agent_blobs_served_total", cache="hit") == 1
        assert value(seen, "docket_agent_blob_sent_bytes_total", cache="hit") == layers[digest]
        assert value(seen, "docket_agent_blob_sent_bytes_total", cache="miss") == layers[digest]
        assert value(seen, "docket_agent_downloads_total", result="ok") == 1
        fetched = by_label(seen, "docket_agent_download_bytes_total", "source")
        assert fetched["peers"] + fetched["registry"] >= layers[digest], fetched
        assert value(seen, "docket_agent_pulls_total") == 1
        assert value(seen, "docket_agent_pull_bytes_total") == image_bytes
        assert value(seen, "docket_agent_blobs_held") == 1
        assert value(seen, "docket_agent_cache_bytes") >= layers[digest]
        assert value(seen, "docket_http_requests_total", route="/v2/<path:name>/blobs/<digest>", method="GET",
                     status="200") == 2
        wait_until(lambda: value(scrape(agent.url), "docket_agent_seeding") == 1, timeout=20,
                   what="the agent seeding the blob it fetched")

    after = scrape(registry.url)
    assert value(after, "docket_pulls_total", api="v2") == 1  # the manifest the agent fetched for its client
    assert value(after, "docket_pull_bytes_total", api="v2") == image_bytes
    assert value(after, "docket_http_requests_total", route="/v2/<path:name>/blobs/<digest>", method="HEAD",
                 status="200") >= 2  # the agent asks the registry before it serves


def test_read_tokens_guard_metrics(tmp_path: Path):
    need("ctorrent")
    need("opentracker")
    registry = RegistryServer(location=tmp_path / "registry", port=free_port(), tracker_port=free_port(),
                              log=tmp_path / "registry.log", extra_args=["--auth-token", PUSH, "--read-token", READ])
    registry.start()
    try:
        refused = requests.get(f"{registry.url}/metrics", timeout=10)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert "docket_" not in refused.text
        wrong = requests.get(f"{registry.url}/metrics", headers={"Authorization": "Bearer not-a-token"}, timeout=10)
        assert wrong.status_code == 401
        for token in (READ, PUSH):
            samples = scrape(registry.url, token)
            assert value(samples, "docket_http_requests_total", route="/metrics", method="GET", status="401") == 2
            assert value(samples, "docket_tracker_up") == 1  # the private tracker's guard passes multi-scrapes
    finally:
        registry.stop()
