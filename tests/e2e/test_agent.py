"""`docket agent` with real parts: dockerd pulling through it, a second agent as the only peer, the registry's
account of the bytes it sent, and the faults of issue 14 (unknown names, a dead registry, a killed agent, a
corrupt peer)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import requests

from tests.support.agent import AgentProcess
from tests.support.procs import free_port, tail, wait_until
from tests.support.registry_server import RegistryServer
from tests.support.tools import need

MANIFEST_ACCEPT = "application/vnd.docker.distribution.manifest.v2+json"


def _agent(tmp_path: Path, registry: RegistryServer, name: str, *args: str, peer_ip: str | None = None) -> AgentProcess:
    return AgentProcess(registry.url, tmp_path / f"agent-{name}", free_port(), tmp_path / f"agent-{name}.log",
                        peer_ip=peer_ip, extra_args=list(args))


def _blobs_sent(registry: RegistryServer, digests: list[str]) -> list[str]:
    """The registry's log lines for blob bytes it sent over HTTP (bodies.send_blob), for these digests."""
    text = registry.log.read_text(errors="replace")
    return [line for line in text.splitlines() if "sending blob" in line and any(d in line for d in digests)]


def _layers(registry: RegistryServer, repo: str, tag: str) -> tuple[dict, list[str]]:
    resp = requests.get(f"{registry.url}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT},
                        timeout=10)
    resp.raise_for_status()
    manifest = resp.json()
    return manifest, [layer["digest"] for layer in manifest["layers"]]


def _sizes(registry: RegistryServer, repo: str, digests: list[str]) -> dict[str, int]:
    return {d: int(requests.head(f"{registry.url}/v2/{repo}/blobs/{d}", timeout=10).headers["Content-Length"])
            for d in digests}


def _push(docket_cli, registry: RegistryServer, image_factory, data_mib: float = 3) -> tuple[str, str, str, str]:
    ref, marker = image_factory.build(data_mib=data_mib)
    docket_cli("push", ref, registry=registry)
    repo, tag = ref.split(":")
    image_factory.remove(ref)
    return ref, marker, repo, tag


def _seeder_pids(registry: RegistryServer, digests: list[str]) -> dict[str, int]:
    seeders = registry.health()["checks"]["seeders"]["seeders"]
    return {d: seeders[d]["pid"] for d in digests if seeders.get(d, {}).get("pid")}


def _state(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("State:"))


@contextlib.contextmanager
def registry_seeders_paused(registry: RegistryServer, digests: list[str]) -> Iterator[dict[str, int]]:
    """SIGSTOP the registry's ctorrent seeders of these blobs (children of the registry this test started), so
    that the other peers are the only BitTorrent source; SIGCONT at the end. A paused seeder still accepts TCP
    connections (the kernel does) but never answers a handshake: it gives nothing."""
    pids = wait_until(lambda: (p := _seeder_pids(registry, digests)) and len(p) == len(digests) and p,
                      timeout=30, what="the registry's seeders")
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    for pid in pids.values():
        wait_until(lambda: _state(pid) in ("T", "t"), timeout=10, what=f"seeder {pid} stopped")
    try:
        yield pids
    finally:
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def test_docker_pull_through_an_agent_gets_the_layers_from_the_other_agent(
        registry_server, image_factory, docket_cli, docker_client, tmp_path: Path):
    """Agent A holds the image and seeds it; the registry's seeders are paused; dockerd pulls through agent B,
    whose only BitTorrent source is A: every layer byte B fetched comes from the peer, the registry sends none
    over HTTP, and the image runs."""
    registry = registry_server
    ref, marker, repo, tag = _push(docket_cli, registry, image_factory, data_mib=4)
    _, layers = _layers(registry, repo, tag)
    assert len(layers) == 3
    with _agent(tmp_path, registry, "a", peer_ip="127.0.41.1") as a, \
            _agent(tmp_path, registry, "b", peer_ip="127.0.42.1") as b:
        for digest in layers:  # A: the first host of a deploy
            got = requests.get(f"{a.url}/v2/{repo}/blobs/{digest}", timeout=120)
            assert got.status_code == 200, got.text
            assert got.headers["Docker-Content-Digest"] == digest
            assert "sha256:" + hashlib.sha256(got.content).hexdigest() == digest
        wait_until(lambda: a.status()["totals"]["seeding"] == len(layers), timeout=20, what="agent A seeds")
        assert _blobs_sent(registry, layers) == []  # A got them through the swarm too

        pulled = f"{b.address}/{repo}:{tag}"
        with registry_seeders_paused(registry, layers):
            t0 = time.monotonic()
            docker_client.images.pull(pulled)
            took = time.monotonic() - t0
            # a mixed swarm: a plain `docket pull` (ctorrent) gets every layer from the agents' seeders
            res = docket_cli("pull", "--json", "--no-load", "--transport", "p2p", "--seed-time", "0", ref,
                             registry=registry, location=tmp_path / "plain-pull", peer_ip="127.0.41.9")
            plain = json.loads(res.stdout)
            assert plain["bytes_from_http"] == 0 and plain["bytes_from_peers"] == sum(
                x["size"] for x in plain["layer_transfers"]), plain
        try:
            assert image_factory.run(pulled) == marker  # `docker run` prints what the image was built to print
            fetched = [d for d in layers if any(x["digest"] == d for x in b.status()["blobs"])]
            assert len(fetched) >= 2, b.status()  # the data and marker layers (dockerd may have busybox's)
            for digest in fetched:
                out = b.outcome(digest)
                assert out["via"] == "p2p", out
                assert out["bytes_from_http"] == 0 and out["bytes_from_peers"] == out["size"] > 0, out
            assert _blobs_sent(registry, layers) == []  # the registry sent no layer byte over HTTP
            status = b.status()
            assert status["totals"]["bytes_from_http"] < 4096  # the config only (it has no torrent)
            assert status["totals"]["seeding"] == len(fetched)  # B seeds what it holds too
            assert status["totals"]["blobs_served"] >= len(fetched) + 1  # the layers and the config, to dockerd
            # A's seeders (one libtorrent session) count what they uploaded: at least B's share of the data layer
            wait_until(lambda: sum(x["uploaded_mb"] for x in a.status()["seeding"]) >= 3, timeout=20,
                       what=f"agent A's upload count: {a.status()['seeding']}")
        finally:
            image_factory.remove(pulled)
    assert took < 90, took


def test_docker_pull_through_one_agent_with_the_registry_seeding(registry_server, image_factory, docket_cli,
                                                                  docker_client, tmp_path: Path):
    """The default set-up: one agent, the registry's seeders; the layers come through BitTorrent, the pull
    works, a second pull of the same image is served from the cache, and a docket pull on the agent's cache
    hands its layers to the agent (no background seeder of its own)."""
    ref, marker, repo, tag = _push(docket_cli, registry_server, image_factory)
    _, layers = _layers(registry_server, repo, tag)
    with _agent(tmp_path, registry_server, "a", peer_ip="127.0.43.1") as a:
        pulled = f"{a.address}/{repo}:{tag}"
        docker_client.images.pull(pulled)
        try:
            assert image_factory.run(pulled) == marker
        finally:
            image_factory.remove(pulled)
        fetched = [d for d in layers if any(x["digest"] == d for x in a.status()["blobs"])]
        assert len(fetched) >= 2
        for digest in fetched:
            assert a.outcome(digest)["via"] == "p2p", a.outcome(digest)
        assert _blobs_sent(registry_server, layers) == []
        downloads = len(a.status()["blobs"])
        docker_client.images.pull(pulled)  # again: the agent holds it
        image_factory.remove(pulled)
        assert len(a.status()["blobs"]) == downloads  # nothing downloaded again

        # docket pull on the agent's cache: the agent is that location's seeder
        res = docket_cli("pull", "--json", ref, registry=registry_server, location=a.cache_dir)
        summary = json.loads(res.stdout)
        # what the agent fetched is in the pull's cache; the rest (busybox) is already in dockerd
        assert summary["layers_cached"] == len(fetched) and summary["layers_downloaded"] == 0, summary
        state = json.loads(docket_cli("seed", "--json", location=a.cache_dir).stdout)
        assert state["agent"] is True and state["pid"] == a.proc.pid
        stop = docket_cli("seed", "--stop", location=a.cache_dir, check=False)
        assert stop.returncode != 0 and "docket agent" in stop.stderr
        image_factory.remove(ref)


def test_a_docket_pull_hands_its_layers_to_the_agent_which_serves_them(registry_server, image_factory, docket_cli,
                                                                       tmp_path: Path):
    ref, _, repo, tag = _push(docket_cli, registry_server, image_factory)
    _, layers = _layers(registry_server, repo, tag)
    with _agent(tmp_path, registry_server, "a", peer_ip="127.0.44.1") as a:
        res = docket_cli("pull", "--json", "--no-load", ref, registry=registry_server, location=a.cache_dir,
                         peer_ip="127.0.44.2")
        assert json.loads(res.stdout)["seeding"] == "background"
        seeded = {s["digest"] for s in a.status()["seeding"]}
        assert seeded == set(layers)  # the agent took the hand-over
        for digest in layers:  # and serves them from its cache without downloading again
            got = requests.get(f"{a.url}/v2/{repo}/blobs/{digest}", timeout=60)
            assert got.status_code == 200 and "sha256:" + hashlib.sha256(got.content).hexdigest() == digest
        assert a.status()["totals"]["downloads"] == 0
        assert a.status()["totals"]["blobs_served"] == len(layers)
        assert _blobs_sent(registry_server, layers) == []


def test_unknown_names_are_the_registrys_404_and_writes_are_refused(registry_server, image_factory, docket_cli,
                                                                    tmp_path: Path):
    ref, _, repo, tag = _push(docket_cli, registry_server, image_factory, data_mib=0.5)
    with _agent(tmp_path, registry_server, "a") as a:
        for path, code in ((f"/v2/{repo}/manifests/nosuchtag", "MANIFEST_UNKNOWN"),
                           (f"/v2/nosuch/repo/manifests/{tag}", None),
                           (f"/v2/{repo}/blobs/sha256:{'0' * 64}", "BLOB_UNKNOWN")):
            got = requests.get(a.url + path, timeout=10)
            assert got.status_code == 404, (path, got.status_code, got.text)
            errs = got.json()["errors"]
            if code:
                assert errs[0]["code"] == code, errs
        for path in ("/v2/Bad..Name/manifests/v1", f"/v2/{repo}/manifests/..", f"/v2/{repo}/blobs/sha256:xyz"):
            got = requests.get(a.url + path, timeout=10)
            assert got.status_code in (400, 404) and "errors" in got.json(), (path, got.text)
        for method, path in (("PUT", f"/v2/{repo}/manifests/{tag}"), ("POST", f"/v2/{repo}/blobs/uploads/"),
                             ("DELETE", f"/v2/{repo}/manifests/{tag}"), ("PATCH", f"/v2/{repo}/blobs/uploads/x")):
            got = requests.request(method, a.url + path, data=b"x", timeout=10)
            assert got.status_code == 405, (method, path, got.status_code)
            err = got.json()["errors"][0]
            assert err["code"] == "UNSUPPORTED" and registry_server.url in err["message"]
        # the registry's tag is still there: nothing was written through the agent
        assert requests.get(f"{a.url}/v2/{repo}/tags/list", timeout=10).json()["tags"] == [tag]
        # by digest: verified and cached; by tag with a HEAD: the registry's headers
        got = requests.get(f"{a.url}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}, timeout=10)
        digest = got.headers["Docker-Content-Digest"]
        head = requests.head(f"{a.url}/v2/{repo}/manifests/{digest}", headers={"Accept": MANIFEST_ACCEPT},
                             timeout=10)
        assert head.status_code == 200 and head.headers["Docker-Content-Digest"] == digest
        assert a.status()["totals"]["manifests_cached"] >= 1
        catalog = requests.get(f"{a.url}/v2/_catalog?ns=127.0.0.1", timeout=10)
        assert repo in catalog.json()["repositories"]


def test_a_dead_registry_is_a_quick_5xx(tmp_path: Path):
    dead = f"http://127.0.0.1:{free_port()}"
    agent = AgentProcess(dead, tmp_path / "agent", free_port(), tmp_path / "agent.log")
    with agent as a:
        for path in ("/v2/", "/v2/app/manifests/v1", f"/v2/app/blobs/sha256:{'1' * 64}", "/v2/app/tags/list"):
            t0 = time.monotonic()
            got = requests.get(a.url + path, timeout=30)
            took = time.monotonic() - t0
            assert got.status_code == 503, (path, got.status_code, got.text)
            assert got.json()["errors"][0]["code"] == "UNAVAILABLE" and dead in got.json()["errors"][0]["message"]
            assert took < 5, (path, took)


def test_an_agent_killed_mid_pull_keeps_what_it_verified(registry_server, image_factory, docket_cli,
                                                         tmp_path: Path):
    """SIGKILL while a slow download runs: after a restart the blobs verified before are served from the cache
    (no new download) and seeded again at once, and the interrupted one completes with the right digest."""
    registry = registry_server
    ref, _, repo, tag = _push(docket_cli, registry, image_factory, data_mib=6)
    _, layers = _layers(registry, repo, tag)
    sizes = _sizes(registry, repo, layers)
    big = max(layers, key=sizes.__getitem__)
    small = [d for d in layers if d != big]
    a = _agent(tmp_path, registry, "a", "--max-download-rate", "300KiB", peer_ip="127.0.45.1")
    a.start()
    try:
        for digest in small:
            assert requests.get(f"{a.url}/v2/{repo}/blobs/{digest}", timeout=60).status_code == 200
        got: dict = {}

        def slow_get() -> None:
            try:
                got["resp"] = requests.get(f"{a.url}/v2/{repo}/blobs/{big}", timeout=60)
            except requests.RequestException as exc:
                got["error"] = exc

        t = threading.Thread(target=slow_get, daemon=True)
        t.start()
        wait_until(lambda: _downloaded(a, big) > 512 * 1024, timeout=30,
                   what="the big layer half-way")
        a.kill()  # its ctorrents die with it
        t.join(30)
        assert "resp" not in got  # the client never got a partial blob as a whole one
        a.start()
        assert a.status()["totals"]["downloads"] == 0
        wait_until(lambda: {s["digest"] for s in a.status()["seeding"]} >= set(small), timeout=20,
                   what="the verified blobs seeded again after the restart")
        for digest in small:
            resp = requests.get(f"{a.url}/v2/{repo}/blobs/{digest}", timeout=60)
            assert resp.status_code == 200 and "sha256:" + hashlib.sha256(resp.content).hexdigest() == digest
        assert a.status()["totals"]["downloads"] == 0  # served from what it verified before the kill
        resp = requests.get(f"{a.url}/v2/{repo}/blobs/{big}", timeout=120)
        assert resp.status_code == 200 and len(resp.content) == sizes[big]
        assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == big
        assert _blobs_sent(registry, layers) == []
    finally:
        a.stop()


def _downloaded(agent: AgentProcess, digest: str) -> int:
    """Bytes of ``digest`` on the agent's disk (allocated: ctorrent's file is sparse while it downloads)."""
    try:
        return (agent.cache_dir / "blobs" / digest.split(":")[1]).stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def test_a_peer_serving_corrupt_pieces_never_reaches_dockerd(registry_server, image_factory, docket_cli,
                                                             docker_client, tmp_path: Path):
    """The only live peer of the biggest layer seeds a same-size file with flipped bytes (ctorrent -f skips its
    own check; the registry's seeders are paused): the agent's ctorrent refuses every piece, the layer comes over
    HTTP once the swarm gave nothing, and dockerd gets the right image."""
    from docket.torrent.ctorrent import CtorrentProcess

    registry = registry_server
    ref, marker, repo, tag = _push(docket_cli, registry, image_factory, data_mib=3)
    _, layers = _layers(registry, repo, tag)
    sizes = _sizes(registry, repo, layers)
    big = max(layers, key=sizes.__getitem__)
    torrent = tmp_path / "evil.torrent"
    torrent.write_bytes(requests.get(f"{registry.url}/api/v1/blobs/{big}/torrent", timeout=10).content)
    good = requests.get(f"{registry.url}/api/v1/blobs/{big}", timeout=30).content
    bad = tmp_path / "evil.blob"
    bad.write_bytes(bytes(b ^ 0xFF for b in good))
    sent_before = len(_blobs_sent(registry, [big]))
    with CtorrentProcess(torrent, bad, workdir=tmp_path / "evil", listen_ip="127.0.46.9", seed_only=True), \
            registry_seeders_paused(registry, layers), \
            _agent(tmp_path, registry, "a", "--fallback-after", "4", peer_ip="127.0.46.1") as a:
        pulled = f"{a.address}/{repo}:{tag}"
        docker_client.images.pull(pulled)
        try:
            assert image_factory.run(pulled) == marker
        finally:
            image_factory.remove(pulled)
        out = a.outcome(big)
        assert out["via"] in ("http", "p2p+http") and out["bytes_from_http"] > 0, out
        assert len(_blobs_sent(registry, [big])) > sent_before
        log = (a.cache_dir / "torrents" / big.split(":")[1] / "ctorrent.log").read_text(errors="replace")
        assert "hash check failed" in log.lower(), log[-3000:]


def test_an_agent_takes_over_from_a_pulls_background_seeder(registry_server, image_factory, docket_cli,
                                                            tmp_path: Path):
    """A `docket pull` ran before the agent started: its background seeder holds the cache. The agent stops it
    (by its checked pid) and seeds the pulled layers itself, hashing each once; another agent on the same cache is
    refused."""
    ref, _, repo, tag = _push(docket_cli, registry_server, image_factory, data_mib=1)
    _, layers = _layers(registry_server, repo, tag)
    cache = tmp_path / "agent-a"
    res = docket_cli("pull", "--json", "--no-load", "--seed-time", "600", ref, registry=registry_server,
                     location=cache, peer_ip="127.0.48.2")
    assert json.loads(res.stdout)["seeding"] == "background"
    seeder_pid = json.loads(docket_cli("seed", "--json", location=cache).stdout)["pid"]
    with _agent(tmp_path, registry_server, "a", peer_ip="127.0.48.1") as a:
        assert not Path(f"/proc/{seeder_pid}").exists()
        wait_until(lambda: {s["digest"] for s in a.status()["seeding"]} == set(layers), timeout=30,
                   what="the agent seeds the pulled layers")
        second = _agent(tmp_path, registry_server, "a")
        second.cache_dir = cache
        res = subprocess.run(second.args(), capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and "another docket agent" in res.stderr, res.stderr


def test_registry_tokens_through_the_agent(tmp_path: Path, image_factory, docket_cli, docker_client):
    """A registry with read tokens: an agent with its own token serves dockerd without credentials; an agent
    without one passes the registry's 401 (and its challenge) through, and forwards the credentials dockerd got
    from the registry's token endpoint (docker login's password is the token)."""
    need("ctorrent")
    push, read = "push-token-agent-0123456789", "read-token-agent-0123456789"
    registry = RegistryServer(location=tmp_path / "registry", port=free_port(), tracker_port=free_port(),
                              log=tmp_path / "registry.log", extra_args=["--auth-token", push, "--read-token", read])
    registry.start()
    try:
        ref, marker = image_factory.build(data_mib=1)
        docket_cli("push", ref, registry=registry, env={"DOCKET_TOKEN": push})
        repo, tag = ref.split(":")
        image_factory.remove(ref)
        with _agent(tmp_path, registry, "a", peer_ip="127.0.49.1") as a, \
                _agent(tmp_path, registry, "b", peer_ip="127.0.49.2") as b:
            a.stop()
            a.env = {"DOCKET_TOKEN": read}
            a.start()
            pulled = f"{a.address}/{repo}:{tag}"
            docker_client.images.pull(pulled)
            try:
                assert image_factory.run(pulled) == marker
            finally:
                image_factory.remove(pulled)
            got = requests.get(f"{b.url}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_ACCEPT}, timeout=10)
            assert got.status_code == 401 and "Bearer" in got.headers.get("WWW-Authenticate", ""), got.text
            got = requests.get(f"{b.url}/v2/{repo}/manifests/{tag}", timeout=10,
                               headers={"Accept": MANIFEST_ACCEPT, "Authorization": f"Bearer {read}"})
            assert got.status_code == 200, got.text
            pulled = f"{b.address}/{repo}:{tag}"
            docker_client.images.pull(pulled, auth_config={"username": "ci", "password": read})
            try:
                assert image_factory.run(pulled) == marker
            finally:
                image_factory.remove(pulled)
    finally:
        registry.stop()


def test_local_clients_asking_for_one_blob_share_one_download(registry_server, image_factory, docket_cli,
                                                              tmp_path: Path):
    ref, _, repo, tag = _push(docket_cli, registry_server, image_factory, data_mib=4)
    _, layers = _layers(registry_server, repo, tag)
    sizes = _sizes(registry_server, repo, layers)
    big = max(layers, key=sizes.__getitem__)
    with _agent(tmp_path, registry_server, "a", "--max-download-rate", "2000KiB", peer_ip="127.0.50.1") as a:
        results: list[requests.Response] = []

        def get() -> None:
            results.append(requests.get(f"{a.url}/v2/{repo}/blobs/{big}", timeout=120))

        threads = [threading.Thread(target=get) for _ in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert len(results) == 5
        assert all(r.status_code == 200 and "sha256:" + hashlib.sha256(r.content).hexdigest() == big
                   for r in results)
        downloads = [b for b in a.status()["blobs"] if b["digest"] == big]
        assert len(downloads) == 1 and downloads[0]["clients"] == 5, downloads
        # a Range request is answered from the verified file
        part = requests.get(f"{a.url}/v2/{repo}/blobs/{big}", headers={"Range": "bytes=10-19"}, timeout=30)
        assert part.status_code == 206 and part.content == results[0].content[10:20]


def test_a_full_cache_evicts_the_least_recently_used_layer_and_fetches_it_again(registry_server, image_factory,
                                                                                docket_cli, tmp_path: Path):
    """--cache-size 5MiB: the layers of image 1 (a 3 MiB data layer) fit; those of image 2 (another 3 MiB) push
    image 1's data layer out (file gone, no longer seeded, "evicted" in the log) while image 2's are held and
    seeded; a GET of image 1's data layer downloads it again and serves the right bytes."""
    registry = registry_server
    images = []
    for _ in range(2):
        _, _, repo, tag = _push(docket_cli, registry, image_factory, data_mib=3)
        _, layers = _layers(registry, repo, tag)
        sizes = _sizes(registry, repo, layers)
        images.append((repo, layers, max(layers, key=sizes.__getitem__)))
    (repo1, layers1, big1), (repo2, layers2, big2) = images
    assert big1 != big2  # the busybox layer is shared: its GET in image 2 makes it recently used
    with _agent(tmp_path, registry, "a", "--cache-size", "5MiB", peer_ip="127.0.47.1") as a:
        def get(repo: str, digest: str) -> None:
            got = requests.get(f"{a.url}/v2/{repo}/blobs/{digest}", timeout=120)
            assert got.status_code == 200, (digest, got.status_code, got.text, tail(a.log))
            assert "sha256:" + hashlib.sha256(got.content).hexdigest() == digest

        def seeding() -> set[str]:
            return {s["digest"] for s in a.status()["seeding"]}

        def held(digest: str) -> bool:
            return (a.cache_dir / "blobs" / digest.split(":")[1]).exists()

        for digest in layers1:
            get(repo1, digest)
        wait_until(lambda: seeding() == set(layers1), timeout=20, what="image 1's layers seeded")
        assert all(held(d) for d in layers1)
        assert "evicted" not in a.log.read_text()  # image 1 alone fits

        for digest in layers2:
            get(repo2, digest)
        wait_until(lambda: big1 not in seeding() and set(layers2) <= seeding(), timeout=20,
                   what="image 1's data layer no longer seeded, image 2's seeded")
        assert not held(big1)
        assert all(held(d) for d in layers2)
        assert any("evicted" in line and big1 in line for line in a.log.read_text().splitlines()), tail(a.log)
        status = a.status()
        assert status["cache_used"] <= status["cache_size"] == 5 * 1024 * 1024, status
        metrics = requests.get(f"{a.url}/metrics", timeout=10).text  # the same, as Prometheus sees it
        assert re.search(r"^docket_agent_evictions_total [1-9]", metrics, re.M), metrics
        assert re.search(r"^docket_agent_cache_limit_bytes 5\.24288e\+06$", metrics, re.M)
        assert not (a.cache_dir / "torrents" / big1.split(":")[1] / "verified").exists()
        assert (a.cache_dir / "torrents" / big1.split(":")[1] / "lock").exists()

        get(repo1, big1)  # needed again: downloaded again
        assert [b["via"] for b in a.status()["blobs"] if b["digest"] == big1] == ["p2p", "p2p"]
        assert held(big1)
        wait_until(lambda: big1 in seeding(), timeout=20, what="image 1's data layer seeded again")
        status = a.status()
        assert status["cache_used"] <= status["cache_size"], status
        # 5 MiB holds one data layer: image 2's went for it; what is held is exactly what is seeded
        assert not held(big2)
        wait_until(lambda: seeding() == {d for d in layers1 + layers2 if held(d)}, timeout=20,
                   what="the seeded blobs to be the held ones")
