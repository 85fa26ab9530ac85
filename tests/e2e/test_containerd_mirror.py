"""containerd pulls through the mirror configuration a `docket agent` deployment uses: a real containerd daemon
(tests/support/containerd.py: private config, temp dirs, native snapshotter) and `ctr images pull --hosts-dir` with a
``hosts.toml`` that names a mirror for the registry's host, so the image keeps the registry's name.

The mirror is the registry itself until the agent exists; pointing it at an agent is the one line marked AGENT in
``mirror_url``. containerd falls back to ``server`` silently when the mirror fails (only a "trying next host" line on
ctr's stderr says so: the second test shows it), so the pull test asserts that line is absent, and an agent's own
accounting must say it served the layers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.containerd import Containerd, write_hosts_toml
from tests.support.procs import free_port
from tests.support.registry_server import RegistryServer

MANIFEST_TYPES = ("application/vnd.docker.distribution.manifest.v2+json", "application/vnd.oci.image.manifest.v1+json")
FALLBACK = "trying next host"  # what ctr logs when a host (the mirror) fails and it moves on to the next


@pytest.fixture
def containerd() -> Iterator[Containerd]:
    with Containerd() as daemon:
        yield daemon


@pytest.fixture
def mirror_url(registry_server: RegistryServer) -> str:
    """The mirror containerd is told to pull through."""
    # AGENT: start a `docket agent` against registry_server here and return its URL instead, e.g.
    #   return agent.url   # http://127.0.0.1:<agent port>
    # containerd then asks it for /v2/<repo>/manifests|blobs/...?ns=127.0.0.1%3A<registry port> (the `ns` query
    # names the registry the mirror stands for: the agent must accept and may ignore it).
    return registry_server.url


def _host(server: RegistryServer) -> str:
    return f"127.0.0.1:{server.port}"


def _layers(server: RegistryServer, repo: str, tag: str) -> list[str]:
    manifest = requests.get(f"{server.url}/v2/{repo}/manifests/{tag}", timeout=10,
                            headers={"Accept": ", ".join(MANIFEST_TYPES)})
    manifest.raise_for_status()
    return [layer["digest"] for layer in manifest.json()["layers"]]


def _unpacked_with(daemon: Containerd, marker: str) -> list[Path]:
    """Snapshot directories holding the image's whole filesystem: busybox, the data layer and the marker."""
    return [d for d in daemon.snapshot_dirs()
            if (d / "marker").is_file() and (d / "marker").read_text().strip() == marker
            and (d / "bin" / "busybox").is_file() and (d / "data.bin").is_file()]


def test_ctr_pull_through_hosts_toml_mirror(containerd: Containerd, registry_server: RegistryServer, mirror_url: str,
                                            image_factory, docket_cli, tmp_path: Path):
    """A multi-layer image pushed with docket push, pulled by containerd through the hosts.toml mirror under the
    registry's own name: listed with the pushed manifest digest, every layer in its content store, unpacked with
    the files the image was built with, and no fallback to the registry."""
    ref, marker = image_factory.build(data_mib=3)  # three layers: busybox, 3 MiB of random data, the marker
    pushed = json.loads(docket_cli("push", "--json", ref, registry=registry_server).stdout)
    repo, tag = ref.rsplit(":", 1)
    layers = _layers(registry_server, repo, tag)
    assert len(layers) == 3

    hosts_dir = tmp_path / "certs.d"
    write_hosts_toml(hosts_dir, _host(registry_server), server=registry_server.url, mirror=mirror_url)
    image = f"{_host(registry_server)}/{ref}"
    started = time.monotonic()
    pull = containerd.pull(image, hosts_dir)
    seconds = time.monotonic() - started
    assert pull.returncode == 0, f"ctr pull failed:\n{pull.stdout}\n{pull.stderr}"
    assert FALLBACK not in pull.stderr, f"the mirror failed and ctr fell back to the registry:\n{pull.stderr}"
    print(f"ctr pull through {mirror_url}: {seconds:.2f} s")

    listed = {row["ref"]: row for row in containerd.images()}
    assert image in listed, listed
    assert listed[image]["digest"] == pushed["digest"]
    assert listed[image]["type"] in MANIFEST_TYPES
    content = containerd.ctr("content", "ls", "-q").stdout.split()
    assert set(layers) <= set(content)
    assert _unpacked_with(containerd, marker), f"no snapshot holds the image's files: {containerd.snapshot_dirs()}"

    if mirror_url != registry_server.url:
        # AGENT: its accounting must list every layer it served (the swarm or its cache, see issue 14); the lead
        # tightens this to "bytes from peers, none from the registry" once the agent's accounting is settled.
        served = requests.get(f"{mirror_url}/_docket/agent", timeout=10).json()
        assert set(layers) <= {blob["digest"] for blob in served["blobs"]}


def test_ctr_falls_back_to_the_server_when_the_mirror_is_down(containerd: Containerd,
                                                               registry_server: RegistryServer,
                                                               image_factory, docket_cli, tmp_path: Path):
    """With the mirror down containerd still pulls, from ``server``, and says so only on stderr: why the mirror
    test checks for that line (and an agent's accounting) rather than trusting a successful pull."""
    ref, marker = image_factory.build(data_mib=1)
    pushed = json.loads(docket_cli("push", "--json", ref, registry=registry_server).stdout)
    layers = _layers(registry_server, *ref.rsplit(":", 1))
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    hosts_dir = tmp_path / "certs.d"
    write_hosts_toml(hosts_dir, _host(registry_server), server=registry_server.url, mirror=f"http://{down}")
    image = f"{_host(registry_server)}/{ref}"

    pull = containerd.pull(image, hosts_dir)
    assert pull.returncode == 0, f"ctr pull failed:\n{pull.stdout}\n{pull.stderr}"
    assert FALLBACK in pull.stderr and down in pull.stderr, pull.stderr
    assert {row["ref"]: row["digest"] for row in containerd.images()}[image] == pushed["digest"]
    assert _unpacked_with(containerd, marker)

    # Leaving the `server` line out does not make the mirror the only way in: containerd 1.6 still appends the
    # registry's own host as the last resort (plain HTTP for a loopback host), so the pull succeeds from it again.
    # The registry always backs a down agent; only the accounting tells the two apart.
    no_server = tmp_path / "no-server"
    path = write_hosts_toml(no_server, _host(registry_server), server=registry_server.url, mirror=f"http://{down}")
    path.write_text(path.read_text().replace(f'server = "{registry_server.url}"\n', ""))
    assert "server" not in path.read_text()
    containerd.ctr("images", "rm", "--sync", image)
    assert not set(layers) & set(containerd.ctr("content", "ls", "-q").stdout.split())
    again = containerd.pull(image, no_server)
    assert again.returncode == 0, f"ctr pull failed:\n{again.stdout}\n{again.stderr}"
    assert FALLBACK in again.stderr and down in again.stderr, again.stderr
    assert set(layers) <= set(containerd.ctr("content", "ls", "-q").stdout.split())
