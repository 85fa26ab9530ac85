"""Host-wide bandwidth limits on real processes (issue 15): a registry whose seeders share --max-upload-rate, and
pulls whose transfers share --max-download-rate, each over three layers moving at once.

Real parts: a docket-registry with its opentracker and ctorrent seeders, the real `docket` command with real
ctorrents (each pull on its own loopback address), a real dockerd for the push. Only lower bounds on time are
asserted (a loaded machine is slower, never faster): with a per-transfer cap the three layers would take a third
of the time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tests.support.agent import AgentProcess
from tests.support.procs import free_port
from tests.support.registry_server import RegistryServer
from tests.support.tools import need

REGISTRY_UP = 2_000_000  # --max-upload-rate 2MB
LAYER_MIB = 1.5


@pytest.fixture(scope="module")
def limited(docker_client, tmp_path_factory: pytest.TempPathFactory):
    """One registry seeding under --max-upload-rate 2MB, and one pushed image of three 1.5 MiB layers."""
    need("ctorrent")
    need("opentracker")
    tmp = tmp_path_factory.mktemp("rates")
    server = RegistryServer(location=tmp / "registry", port=free_port(), tracker_port=free_port(),
                            log=tmp / "registry.log", extra_args=["--max-upload-rate", "2MB"])
    ref = f"docket-test/rates-{uuid.uuid4().hex[:8]}:v1"
    ctx = tmp / "ctx"
    ctx.mkdir()
    lines = ["FROM scratch"]
    for name in "abc":
        (ctx / name).write_bytes(os.urandom(int(LAYER_MIB * 1024 * 1024)))
        lines.append(f"COPY {name} /{name}")
    (ctx / "Dockerfile").write_text("\n".join(lines) + '\nCMD ["/a"]\n')
    docker_client.images.build(path=str(ctx), tag=ref, rm=True, forcerm=True)
    shutil.rmtree(ctx)
    server.start()
    try:
        _docket(server, tmp / "pusher", "push", ref)
        record = requests.get(f"{server.url}/api/v1/repositories/{ref.split(':')[0]}/tags/v1", timeout=10).json()
        total = sum(layer["size"] for layer in record["layers"])
        assert len(record["layers"]) == 3 and total > 4_500_000
        yield server, ref, total, tmp
    finally:
        server.stop()
        docker_client.images.remove(ref, force=True)


def _docket(server: RegistryServer, location: Path, *args: str, peer_ip: str | None = None) -> dict | None:
    env = {**os.environ, **({"DOCKET_PEER_IP": peer_ip} if peer_ip else {})}
    cmd = [sys.executable, "-m", "docket.client.cli", "--host", "http://127.0.0.1", "--port", str(server.port),
           "--location", str(location), *args]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout) if "--json" in args else None


def _pull(limited, name: str, peer_ip: str, *flags: str) -> tuple[float, dict]:
    server, ref, _, tmp = limited
    started = time.monotonic()
    summary = _docket(server, tmp / name, "pull", "--no-load", "--json", "--seed-time", "0", *flags, ref,
                      peer_ip=peer_ip)
    return time.monotonic() - started, summary


def test_registry_seeders_share_one_upload_limit(limited):
    """Three layers from three seeders at once still come at <= 2 MB/s in total (unlimited: well under 1 s)."""
    _, _, total, _ = limited
    took, _ = _pull(limited, "p2p", "127.0.61.1", "--transport", "p2p")
    assert took >= total / (1.1 * REGISTRY_UP), f"{total} bytes in {took:.1f} s: above 2 MB/s"


def test_a_pull_holds_its_download_limit_over_bittorrent_and_http(limited):
    """--max-download-rate 700KB over three concurrent ctorrents, then over HTTP: each pull takes at least the
    time the limit allows (the registry alone would allow 2 MB/s)."""
    _, _, total, _ = limited
    took, _ = _pull(limited, "limited-p2p", "127.0.62.1", "--transport", "p2p", "--max-download-rate", "700KB")
    assert took >= total / (1.1 * 700_000), f"{total} bytes in {took:.1f} s over BitTorrent: above 700 KB/s"
    took, _ = _pull(limited, "limited-http", "127.0.63.1", "--transport", "http", "--max-download-rate", "1MB")
    assert took >= total / (1.1 * 1_000_000), f"{total} bytes in {took:.1f} s over HTTP: above 1 MB/s"


def test_an_agent_holds_its_download_limit_over_concurrent_blob_requests(limited):
    """Three local clients ask a `docket agent --max-download-rate 700KB` for the three layers at once: together
    they arrive no faster than the agent's one budget allows."""
    server, ref, total, tmp = limited
    repo, tag = ref.split(":")
    manifest = requests.get(f"{server.url}/v2/{repo}/manifests/{tag}", timeout=10,
                            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"}).json()
    digests = [layer["digest"] for layer in manifest["layers"]]
    agent = AgentProcess(registry_url=server.url, cache_dir=tmp / "agent", port=free_port(), log=tmp / "agent.log",
                         peer_ip="127.0.64.1", extra_args=["--max-download-rate", "700KB"])
    agent.start()
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(3) as pool:
            sizes = list(pool.map(lambda d: len(requests.get(f"{agent.url}/v2/{repo}/blobs/{d}", timeout=120)
                                                .content), digests))
        took = time.monotonic() - started
    finally:
        agent.stop()
    assert sum(sizes) == total
    assert took >= total / (1.1 * 700_000), f"{total} bytes in {took:.1f} s through the agent: above 700 KB/s"
