"""Several registry instances as one registry: real HAProxy (deploy/haproxy.cfg, round-robin) over two
docket-registry processes on loopback, one PostgreSQL database, one shared blob directory, one external tracker
(docket-tracker keeping opentracker's whitelist from the registry through HAProxy), real dockerd and ctorrent.

One setup serves the whole module (starting it takes seconds); each test starts with both instances running and UP
(a killed one is started again). The tests run in file order (the suite runs with --dist loadfile) on purpose: the
GC scenario (``pending_upload``) is opened with the first test on the instance that does not lead and checked once
the grace period has passed (the tests between fill that time), before any instance is restarted or killed.

PostgreSQL: the suite's ``postgres`` server (tests/conftest.py); a database on it for the module, dropped afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.haproxy import SERVERS, HAProxy
from tests.support.procs import free_port, managed_process, pid_gone, port_open, process_argvs, tail, wait_until
from tests.support.postgres import PostgresServer
from tests.support.registry_server import RegistryServer
from tests.support.tools import docker_cli, need, program

GC_GRACE = 60.0  # the shortest --gc-grace the registry accepts
SEED_ADDRESSES = ("127.0.16.1", "127.0.16.2")  # each instance's seeders (ctorrent drops same-address peers)
MANIFEST_TYPES = ", ".join(["application/vnd.oci.image.manifest.v1+json",
                            "application/vnd.docker.distribution.manifest.v2+json",
                            "application/vnd.oci.image.index.v1+json",
                            "application/vnd.docker.distribution.manifest.list.v2+json"])


# --- PostgreSQL: a database of our own on the suite's server --------------------------------------------------


def _libpq_url(url: str) -> str:
    """psycopg takes the SQLAlchemy URL without its driver suffix."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(scope="module")
def ha_database(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the suite's PostgreSQL server (the first instance migrates it), dropped after
    the module."""
    name = postgres.create_database()
    try:
        yield postgres.url(name)
    finally:
        postgres.drop_database(name)


# --- the cluster -------------------------------------------------------------------------------------------


@dataclass
class Cluster:
    """Two instances, HAProxy in front, the tracker, the database; helpers to look at all of them."""

    db_url: str
    location: Path
    instances: list[RegistryServer]
    haproxy: HAProxy
    tracker: subprocess.Popen
    tracker_log: Path
    notes: dict[str, Any] = field(default_factory=dict)  # what one test leaves for a later one
    peers: int = 10  # the last 127.0.16.x given to a client

    def peer(self) -> str:
        """A fresh loopback address for a docket pull that stands for another host (ctorrent: one per address)."""
        self.peers += 1
        assert self.peers < 255
        return f"127.0.16.{self.peers}"

    @property
    def url(self) -> str:
        return self.haproxy.url

    @property
    def port(self) -> int:  # what the docket_cli fixture reads from a "registry"
        return self.haproxy.port

    def server_name(self, inst: RegistryServer) -> str:
        return SERVERS[self.instances.index(inst)]

    def sql(self, statement: str, *params: Any) -> list[tuple]:
        import psycopg

        with psycopg.connect(_libpq_url(self.db_url), autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def rows(self) -> dict[int, dict[str, Any]]:
        """registry_instances by the instance's port (its url ends with it): the latest row of each (a killed
        instance's row stays behind, with the leader flag it had, until it is forgotten)."""
        found = {}
        for url, leader, seen_at, push_since in self.sql(
                "SELECT DISTINCT ON (url) url, leader, seen_at, push_since FROM registry_instances "
                "ORDER BY url, started_at DESC"):
            found[int(url.rsplit(":", 1)[1])] = {"leader": leader, "seen_at": seen_at, "push_since": push_since}
        return found

    def leader(self, timeout: float = 10.0) -> RegistryServer:
        """The one live instance whose row says it leads."""
        def one() -> RegistryServer | None:
            rows = self.rows()
            leaders = [i for i in self.instances if i.proc is not None and rows.get(i.port, {}).get("leader")]
            return leaders[0] if len(leaders) == 1 else None

        return wait_until(one, timeout=timeout, interval=0.2, what="exactly one leader among the live instances")

    def other(self, inst: RegistryServer) -> RegistryServer:
        return self.instances[1 - self.instances.index(inst)]

    def kill(self, inst: RegistryServer) -> None:
        inst.kill()
        self.haproxy.wait_status({self.server_name(inst): "DOWN"}, timeout=10)

    def revive(self, inst: RegistryServer) -> None:
        """Start a killed instance again and wait until HAProxy sends it requests."""
        if inst.proc is None:
            inst.start()
        self.haproxy.wait_all_up(timeout=30)

    def served_by(self) -> dict[str, int]:
        """HAProxy's count of sessions (requests) sent to each server so far: which instances answered."""
        return {r["svname"]: int(r["stot"] or 0) for r in self.haproxy.stats()
                if r["pxname"] == "registries" and r["svname"] in SERVERS}


@pytest.fixture(scope="module")
def cluster(ha_database: str, tmp_path_factory: pytest.TempPathFactory, docker_host: str) -> Iterator[Cluster]:
    need("ctorrent")
    need("opentracker")
    need("haproxy")
    root = tmp_path_factory.mktemp("ha")
    location = root / "location"
    ports = [free_port(), free_port()]
    hp = HAProxy(port=free_port(), backends=(f"127.0.0.1:{ports[0]}", f"127.0.0.1:{ports[1]}"),
                 workdir=root / "haproxy")
    tracker_port = free_port()
    tracker_log = root / "tracker.log"
    # The tracker first (a manifest commits once the tracker takes its layers' announces; the full /healthz checks
    # it). It follows the whitelist through HAProxy, retrying until HAProxy answers, as the compose file runs it.
    tracker_args = [program("docket-tracker"), "--registry", hp.url, "--port", str(tracker_port),
                    "--bind", "127.0.0.1", "--interval", "0.5", "--workdir", str(root / "tracker"),
                    "--log-level", "INFO"]
    instances = [
        RegistryServer(location=location, port=port, tracker_port=free_port(), log=root / f"registry-{n + 1}.log",
                       db_url=ha_database, tracker=f"127.0.0.1:{tracker_port}", seed_address=SEED_ADDRESSES[n],
                       ready_scope="instance",
                       extra_args=["--gc-interval", "1", "--gc-grace", str(GC_GRACE), "--scrub-interval", "0",
                                   "--min-free-space", "0"])
        for n, port in enumerate(ports)
    ]
    with managed_process(tracker_args, tracker_log) as tracker:
        wait_until(lambda: port_open("127.0.0.1", tracker_port), timeout=20, what="docket-tracker's opentracker")
        started: list[RegistryServer] = []
        try:
            for inst in instances:  # one after the other: the first one leads
                inst.start()
                started.append(inst)
            hp.start()
            hp.wait_all_up(timeout=30)
            c = Cluster(db_url=ha_database, location=location, instances=instances, haproxy=hp, tracker=tracker,
                        tracker_log=tracker_log)
            yield c
        except BaseException:
            for inst in instances:
                print(f"--- tail of {inst.log} ---\n{tail(inst.log)}")
            print(f"--- tail of {hp.log} ---\n{tail(hp.log)}")
            raise
        finally:
            hp.stop()
            for inst in started:
                if inst.proc is not None:
                    inst.stop()
            left = stop_seeders_under(location)
            if left:
                print(f"stopped {len(left)} seeder(s) the instances left running: {left}")


@pytest.fixture(autouse=True)
def _whole_cluster(cluster: Cluster) -> Iterator[None]:
    """Each test starts with both instances running and in HAProxy's rotation (a test that failed between a
    kill and the restart leaves one down)."""
    for inst in cluster.instances:
        if inst.proc is None:
            inst.start()
    try:
        cluster.haproxy.wait_all_up(timeout=20)
    except AssertionError as exc:
        health = {}
        for inst in cluster.instances:
            try:
                health[inst.port] = requests.get(f"{inst.url}/healthz", timeout=10).json()
            except Exception as err:  # noqa: BLE001 - reported below
                health[inst.port] = repr(err)
        raise AssertionError(f"{exc}\n/healthz of the instances: {json.dumps(health, indent=1, default=str)}")
    yield


# --- helpers -----------------------------------------------------------------------------------------------


def stop_seeders_under(location: Path) -> list[int]:
    """The ctorrents still seeding files of ``location`` (our instances': an instance killed or stopped while
    starting one can leave it behind), stopped by pid; their pids."""
    marker = os.fsencode(str(location)) + b"/"
    found = [pid for pid, argv in process_argvs()
             if argv and os.path.basename(argv[0]) == b"ctorrent" and any(a.startswith(marker) for a in argv)]
    for pid in found:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    for pid in found:
        try:
            wait_until(lambda pid=pid: pid_gone(pid), timeout=5, what=f"ctorrent {pid} to stop")
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return found



def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()



def docket_argv(cluster: Cluster, location: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "docket.client.cli", "--host", "http://127.0.0.1", "--port", str(cluster.port),
            "--location", str(location), *args]


def clear_failure(result: subprocess.CompletedProcess) -> None:
    """A failed command said why in one line, without a traceback."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "Error:" in result.stderr or "error:" in result.stderr, result.stderr


def manifest(base: str, name: str, reference: str) -> tuple[dict[str, Any], str]:
    resp = requests.get(f"{base}/v2/{name}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES}, timeout=30)
    assert resp.status_code == 200, (base, name, reference, resp.status_code, resp.text[:300])
    return resp.json(), resp.headers["Docker-Content-Digest"]


def blob_ok(base: str, name: str, digest: str) -> bool:
    """The whole blob can be read and hashes to its digest."""
    h = hashlib.sha256()
    with requests.get(f"{base}/v2/{name}/blobs/{digest}", stream=True, timeout=60) as resp:
        if resp.status_code != 200:
            return False
        for chunk in resp.iter_content(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest() == digest


def blob_there(base: str, name: str, digest: str, size: int) -> bool:
    resp = requests.head(f"{base}/v2/{name}/blobs/{digest}", timeout=30)
    return resp.status_code == 200 and int(resp.headers.get("Content-Length", -1)) == size


def assert_consistent(cluster: Cluster) -> dict[str, list[str]]:
    """Every live instance lists the same repositories and tags, and every blob of every tag's manifest is there
    with its size on each instance, and whole (read and hashed once; the store is shared): nothing half-committed
    is visible, no blob is lost. Returns the tags."""
    live = [i for i in cluster.instances if i.proc is not None]
    verified: set[str] = cluster.notes.setdefault("verified", set())
    listings = []
    for inst in live:
        repos = requests.get(f"{inst.url}/v2/_catalog?n=10000", timeout=30).json()["repositories"]
        tags = {r: sorted(requests.get(f"{inst.url}/v2/{r}/tags/list", timeout=30).json().get("tags") or [])
                for r in repos}
        listings.append(tags)
    assert all(t == listings[0] for t in listings), listings
    for repo, tags in listings[0].items():
        for tag in tags:
            for inst in live:
                doc, _ = manifest(inst.url, repo, tag)
                images = [manifest(inst.url, repo, m["digest"])[0] for m in doc.get("manifests", [])]
                if "config" in doc:
                    images.append(doc)
                for image in images:
                    for desc in [image["config"], *image["layers"]]:
                        digest, size = desc["digest"], desc["size"]
                        assert blob_there(inst.url, repo, digest, size), f"{repo}:{tag} via {inst.url}: {digest}"
                        if digest not in verified:
                            assert blob_ok(inst.url, repo, digest), f"{repo}:{tag} via {inst.url}: {digest} damaged"
                            verified.add(digest)
    return listings[0]


def layer_digests(base: str, name: str, tag: str) -> list[str]:
    doc, _ = manifest(base, name, tag)
    return [layer["digest"] for layer in doc["layers"]]


def seeders_alive(inst: RegistryServer) -> set[str]:
    reply = requests.get(f"{inst.url}/api/v1/seeders", timeout=10).json()
    return {s["digest"] for s in reply["seeders"] if s.get("alive")}


def seeder_pids(inst: RegistryServer) -> dict[str, int]:
    """digest -> pid of each running seeder of the instance."""
    reply = requests.get(f"{inst.url}/api/v1/seeders", timeout=10).json()
    return {s["digest"]: s["pid"] for s in reply["seeders"] if s.get("alive")}


def steady_seeders(inst: RegistryServer) -> dict[str, int]:
    """``seeder_pids`` once they stay the same for 8 s: a seeder the tracker refused at first (started before
    docket-tracker's whitelist caught up) exits and is started again by its own instance about 5 s later."""
    seen: list[dict[str, int]] = []

    def same() -> dict[str, int] | None:
        seen.append(seeder_pids(inst))
        recent = seen[-5:]
        return recent[0] if len(recent) == 5 and recent[0] and all(r == recent[0] for r in recent) else None

    return wait_until(same, timeout=45, interval=2, what="the instance's seeders to settle")


@pytest.fixture
def docker_config(tmp_path: Path) -> Path:
    path = tmp_path / "docker-config"
    path.mkdir()
    return path


def oci_image(marker: bytes) -> tuple[bytes, bytes]:
    """(an uncompressed tar layer holding ``marker``, its image config)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("marker")
        info.size = len(marker)
        tar.addfile(info, io.BytesIO(marker))
    layer = buf.getvalue()
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha256(layer)]}}).encode()
    return layer, config


def put_blob(base: str, name: str, data: bytes) -> str:
    digest = sha256(data)
    resp = requests.post(f"{base}/v2/{name}/blobs/uploads/?digest={digest}", data=data,
                         headers={"Content-Type": "application/octet-stream"}, timeout=60)
    assert resp.status_code == 201, resp.text
    return digest


def oci_manifest(config: bytes, layer: bytes) -> bytes:
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha256(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha256(layer),
                    "size": len(layer)}],
    }).encode()


@pytest.fixture(scope="module")
def pending_upload(cluster: Cluster) -> dict[str, Any]:
    """An upload in progress on the instance that does not lead: a /v2 session open, and blobs uploaded for a
    manifest not yet PUT. The leader's GC must keep them however long the push takes: checked by
    test_gc_on_the_leader_keeps_blobs_of_an_upload_in_progress once the grace has passed (the first test asks for
    this fixture, so that the tests between them fill that time)."""
    holder = cluster.other(cluster.leader())
    name = "ha/gc-pending"
    layer, config = oci_image(uuid.uuid4().hex.encode())
    opened = requests.post(f"{holder.url}/v2/{name}/blobs/uploads/", timeout=10)
    assert opened.status_code == 202, opened.text
    first = requests.patch(f"{holder.url}{opened.headers['Location']}", data=b"x" * 1024,
                           headers={"Content-Type": "application/octet-stream"}, timeout=10)
    assert first.status_code == 202, first.text
    return {"holder": holder, "name": name, "layer": layer, "config": config,
            "layer_digest": put_blob(holder.url, name, layer), "config_digest": put_blob(holder.url, name, config),
            "session": first.headers["Location"], "opened": time.monotonic()}


# --- the tests, in order -----------------------------------------------------------------------------------


def test_both_instances_up_behind_haproxy_with_one_leader(cluster: Cluster, pending_upload: dict[str, Any]):
    """HAProxy's health checks pass on both; each instance has its row; one leads. (``pending_upload`` starts the
    GC scenario's clock here, on the instance that does not lead.)"""
    assert pending_upload["holder"] is not cluster.instances[0]
    assert cluster.haproxy.server_status() == {name: "UP" for name in SERVERS}
    rows = cluster.rows()
    assert {i.port for i in cluster.instances} <= rows.keys()
    leader = cluster.leader()
    assert leader is cluster.instances[0]  # started first
    # Requests through HAProxy reach both instances (round-robin per request).
    before = cluster.served_by()
    for _ in range(6):
        assert requests.get(f"{cluster.url}/v2/", timeout=10).status_code == 200
    after = cluster.served_by()
    assert all(after[s] > before[s] for s in SERVERS), (before, after)


def test_docket_push_and_pull_through_haproxy(cluster: Cluster, image_factory, docket_cli, tmp_path: Path):
    ref, marker = image_factory.build(data_mib=4)
    image_id = image_factory.client.images.get(ref).id
    before = cluster.served_by()
    docket_cli("push", ref, registry=cluster)
    after = cluster.served_by()
    assert all(after[s] > before[s] for s in SERVERS), f"the push did not go to both instances: {before} {after}"

    image_factory.remove(ref)
    summary = json.loads(docket_cli("pull", ref, "--json", "--seed-time", "0", registry=cluster,
                                    peer_ip=cluster.peer(), location=tmp_path / "host2").stdout)
    assert summary["image_id"] == image_id
    assert image_factory.run(ref) == marker
    name, tag = ref.rsplit(":", 1)
    assert tag in assert_consistent(cluster)[name]


def test_docker_push_and_pull_through_haproxy(cluster: Cluster, image_factory, docket_cli, docker_config,
                                              tmp_path: Path):
    """docker push's upload sessions cross instances (round-robin): each PATCH/PUT may land on either."""
    ref, marker = image_factory.build(data_mib=3)
    remote = f"127.0.0.1:{cluster.port}/ha/docker:v1"
    image_factory.client.images.get(ref).tag(remote)
    image_factory.built.append(remote)
    push = docker_cli("push", remote, config=docker_config)
    digest = push.stdout.split("digest: ")[1].split()[0]
    for inst in cluster.instances:
        assert manifest(inst.url, "ha/docker", "v1")[1] == digest

    image_id = image_factory.client.images.get(ref).id
    image_factory.remove(remote)
    image_factory.remove(ref)
    docker_cli("pull", remote, config=docker_config)
    assert image_factory.client.images.get(remote).id == image_id
    image_factory.remove(remote)
    summary = json.loads(docket_cli("pull", "--json", "--seed-time", "0", "ha/docker:v1", registry=cluster,
                                    peer_ip=cluster.peer(), location=tmp_path / "host3").stdout)
    image_factory.built.append("ha/docker:v1")
    assert summary["image_id"] == image_id
    assert image_factory.run("ha/docker:v1") == marker
    assert_consistent(cluster)


def test_a_blob_pushed_through_one_is_seeded_by_the_other(cluster: Cluster, image_factory, docket_cli):
    ref, _ = image_factory.build(data_mib=2)
    first, second = cluster.instances
    docket_cli("push", ref, registry=first)  # straight to the first instance, not through HAProxy
    name, tag = ref.rsplit(":", 1)
    layers = set(layer_digests(first.url, name, tag))
    assert layers <= seeders_alive(first)
    started = time.monotonic()
    wait_until(lambda: layers <= seeders_alive(second), timeout=15, interval=0.5,
               what="the other instance to seed the new layers")
    assert time.monotonic() - started < 10
    assert second.health()["status"] == "ok"


def test_gc_on_the_leader_keeps_blobs_of_an_upload_in_progress(cluster: Cluster, pending_upload: dict[str, Any]):
    """The upload opened by the first test on the instance that does not lead is older than the grace now; GC ran
    on the leader all along (--gc-interval 1) and must have kept its blobs; an unreferenced blob from before it
    (backdated) is collected, so GC did run. Then the push finishes: its manifest commits."""
    gc = pending_upload
    holder: RegistryServer = gc["holder"]
    leader = cluster.leader()
    assert leader is not holder and holder.proc is not None
    # A control: an unreferenced blob well past the grace, from before any push began.
    control = put_blob(leader.url, "ha/gc-control", os.urandom(4096))
    cluster.sql("UPDATE blobs SET unreferenced_at = %s WHERE digest = %s",
                datetime.now(timezone.utc).replace(tzinfo=None) - timedelta(hours=2), control)
    wait = gc["opened"] + GC_GRACE + 3 - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    wait_until(lambda: not cluster.sql("SELECT 1 FROM blobs WHERE digest = %s", control), timeout=20,
               what="GC to collect the backdated control blob")
    for digest in (gc["layer_digest"], gc["config_digest"]):
        assert cluster.sql("SELECT 1 FROM blobs WHERE digest = %s", digest), f"GC removed {digest} of the push"
        for inst in cluster.instances:
            assert blob_ok(inst.url, gc["name"], digest)
    # The session is still there and the push completes.
    session = gc["session"]
    done = requests.put(f"{holder.url}{session}{'&' if '?' in session else '?'}digest={sha256(b'x' * 1024)}",
                        timeout=10)
    assert done.status_code == 201, done.text
    body = oci_manifest(gc["config"], gc["layer"])
    put = requests.put(f"{cluster.url}/v2/{gc['name']}/manifests/v1", data=body,
                       headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, timeout=60)
    assert put.status_code == 201, put.text
    assert "v1" in assert_consistent(cluster)[gc["name"]]


def test_restarting_one_instance_leaves_the_others_push_and_seeders_alone(cluster: Cluster, image_factory,
                                                                        docket_cli, tmp_path: Path):
    """An instance starting up (after a crash, an upgrade) must not clean the shared location under the other:
    its upload files, its /v2 sessions, its seeders."""
    ref, _ = image_factory.build(data_mib=24)
    first, second = cluster.instances
    seeding_before = steady_seeders(first)
    argv = [sys.executable, "-m", "docket.client.cli", "--port", str(first.port), "--location",
            str(tmp_path / "client"), "push", ref]  # straight to the first instance
    push = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: any(p.stat().st_size > 4 << 20 for p in (cluster.location / "uploads").iterdir()
                               if p.is_file()), timeout=60, interval=0.02, what="the push's upload to be under way")
        second.restart()
        out, err = push.communicate(timeout=120)
    finally:
        if push.poll() is None:
            push.kill()
            push.wait()
    assert push.returncode == 0, err
    after = seeder_pids(first)
    stopped = {d: pid for d, pid in seeding_before.items() if after.get(d) != pid}
    assert not stopped, f"the restarted instance stopped the other's seeders: {stopped}"
    cluster.haproxy.wait_all_up()
    assert_consistent(cluster)


def _kill_mid_transfer(cluster: Cluster, proc: subprocess.Popen, direction: str, threshold: int) -> RegistryServer:
    """Wait until one instance is moving a big body for ``proc`` (HAProxy's per-server bytes in or out grow past
    ``threshold`` during the command), then SIGKILL that instance; returns it."""
    key = "bin" if direction == "in" else "bout"

    def counts() -> dict[str, int]:
        return {r["svname"]: int(r[key] or 0) for r in cluster.haproxy.stats()
                if r["pxname"] == "registries" and r["svname"] in SERVERS}

    start = counts()

    def busy() -> str | None:
        if proc.poll() is not None:
            return "ended"
        now = counts()
        return next((s for s in SERVERS if now[s] - start[s] > threshold), None)

    victim_name = wait_until(busy, timeout=120, interval=0.02, what="a big transfer through HAProxy")
    if victim_name == "ended":
        out, err = proc.communicate()
        raise AssertionError(f"the command ended (exit {proc.returncode}) before the kill:\n{out}\n{err}")
    victim = cluster.instances[SERVERS.index(victim_name)]
    cluster.kill(victim)
    return victim


def _run_killing(cluster: Cluster, argv: list[str], direction: str, threshold: int,
                 env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, RegistryServer]:
    """Run ``argv``, SIGKILL the instance moving its big body (``_kill_mid_transfer``), let it finish (at most
    3 minutes); returns its result and the instance killed."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        victim = _kill_mid_transfer(cluster, proc, direction, threshold)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(argv, proc.returncode, out, err), victim


def test_sigkill_in_the_middle_of_a_push(cluster: Cluster, image_factory, docket_cli, tmp_path: Path):
    ref, marker = image_factory.build(data_mib=64)
    name, tag = ref.rsplit(":", 1)
    result, victim = _run_killing(cluster, docket_argv(cluster, tmp_path / "client", "push", ref), "in", 8 << 20)
    err = result.stderr
    survivor = cluster.other(victim)
    if result.returncode != 0:
        clear_failure(result)
        # Nothing half-committed: the tag is not there (it was new), and what is there is whole.
        tags = requests.get(f"{survivor.url}/v2/{name}/tags/list", timeout=10)
        assert tags.status_code == 404 or tag not in (tags.json().get("tags") or [])
        assert_consistent(cluster)
        docket_cli("push", ref, registry=cluster)  # repeated, with one instance down: HAProxy sends it on
    assert tag in assert_consistent(cluster)[name]
    print(f"docket push with an instance killed mid-upload: exit {result.returncode} {err.strip()[-300:]}")
    cluster.revive(victim)
    assert_consistent(cluster)
    cluster.notes["big"] = (ref, marker)  # pulled (and run) by the pull tests below


def test_sigkill_in_the_middle_of_a_docker_push(cluster: Cluster, image_factory, docker_config):
    """docker push through HAProxy, the instance receiving a layer killed: docker retries the layer (its upload
    session goes on, or starts again, on the survivor), or fails clearly and the repeated push succeeds."""
    ref, _ = image_factory.build(data_mib=48)
    remote = f"127.0.0.1:{cluster.port}/ha/docker-killed:v1"
    image_factory.client.images.get(ref).tag(remote)
    image_factory.built.append(remote)
    push, victim = _run_killing(cluster, [need("docker"), "push", remote], "in", 8 << 20,
                                env={**os.environ, "DOCKER_CONFIG": str(docker_config)})
    out, err = push.stdout, push.stderr
    print(f"docker push with an instance killed mid-upload: exit {push.returncode}")
    if push.returncode != 0:
        assert "error" in (out + err).lower() or "unknown" in (out + err).lower(), out + err
        tags = requests.get(f"{cluster.other(victim).url}/v2/ha/docker-killed/tags/list", timeout=10)
        assert tags.status_code == 404 or "v1" not in (tags.json().get("tags") or [])
        out = docker_cli("push", remote, config=docker_config).stdout
    digest = out.split("digest: ")[1].split()[0]
    assert "v1" in assert_consistent(cluster)["ha/docker-killed"]
    cluster.revive(victim)
    for inst in cluster.instances:
        assert manifest(inst.url, "ha/docker-killed", "v1")[1] == digest


def test_sigkill_in_the_middle_of_a_pull(cluster: Cluster, image_factory, docket_cli, tmp_path: Path):
    """docket pull over HTTP (rate-limited, so the kill lands mid-body): the blob's body is cut when its instance
    dies; the pull resumes it from the other (or fails clearly, and the repeated pull finishes)."""
    ref, marker = cluster.notes.get("big") or (None, None)
    if ref is None:  # the push test failed: push one now
        ref, marker = image_factory.build(data_mib=64)
        docket_cli("push", ref, registry=cluster)
    image_factory.remove(ref)
    location = tmp_path / "puller"
    result, victim = _run_killing(cluster, docket_argv(cluster, location, "pull", ref, "--transport", "http",
                                                       "--seed-time", "0", "--max-download-rate", "25MB"),
                                  "out", 16 << 20)
    if result.returncode != 0:
        clear_failure(result)
        docket_cli("pull", ref, "--transport", "http", "--seed-time", "0", registry=cluster, location=location)
    print(f"docket pull with an instance killed mid-body: exit {result.returncode}")
    assert image_factory.run(ref) == marker
    assert_consistent(cluster)
    cluster.revive(victim)


def test_docker_pull_survives_sigkill_of_the_instance_sending_a_layer(cluster: Cluster, image_factory,
                                                                     docker_config, docket_cli):
    ref, marker = cluster.notes.get("big") or (None, None)
    if ref is None:
        ref, marker = image_factory.build(data_mib=64)
        docket_cli("push", ref, registry=cluster)
    remote = f"127.0.0.1:{cluster.port}/{ref}"
    image_factory.remove(ref)
    image_factory.remove(remote)
    image_factory.built.append(remote)
    pull, victim = _run_killing(cluster, [need("docker"), "pull", remote], "out", 8 << 20,
                                env={**os.environ, "DOCKER_CONFIG": str(docker_config)})
    if pull.returncode != 0:
        assert "error" in pull.stderr.lower(), pull.stderr
        docker_cli("pull", remote, config=docker_config)
    print(f"docker pull with an instance killed mid-layer: exit {pull.returncode}")
    assert image_factory.run(remote) == marker
    cluster.revive(victim)


def test_the_leader_killed_another_leads_within_seconds(cluster: Cluster):
    leader = cluster.leader()
    other = cluster.other(leader)
    killed_at = time.monotonic()
    cluster.kill(leader)
    wait_until(lambda: cluster.rows().get(other.port, {}).get("leader"), timeout=10, interval=0.2,
               what="the other instance to lead")
    took = time.monotonic() - killed_at
    assert took < 6, f"leadership moved after {took:.1f} s"
    cluster.revive(leader)
    assert cluster.leader() is other  # the restarted one does not take it back
    assert_consistent(cluster)
