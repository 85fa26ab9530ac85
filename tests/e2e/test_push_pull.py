"""End to end: real dockerd, real docket-registry (cheroot) with its managed opentracker, real ctorrent.

Each pull that stands for "another host" uses its own loopback address (DOCKET_PEER_IP), as a second
machine would have its own IP; one pull uses no flags at all (the same-host case).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest



def images_json(docket_cli, registry) -> list[dict]:
    out = docket_cli("images", "--json", registry=registry).stdout
    return json.loads(out)


def test_push_remove_pull_run(registry_server, image_factory, docket_cli, tmp_path: Path):
    ref, marker = image_factory.build(data_mib=4)
    image_id = image_factory.client.images.get(ref).id

    pushed = docket_cli("push", ref, registry=registry_server)
    assert "sha256:" in pushed.stdout

    listed = images_json(docket_cli, registry_server)
    record = next(r for r in listed if r["ref"] == ref)
    assert record["image_id"] == image_id
    assert record["digest"].startswith("sha256:")

    image_factory.remove(ref)
    pulled = docket_cli("pull", ref, "--json", "--seed-time", "0", registry=registry_server,
                        peer_ip="127.0.0.9")
    summary = json.loads(pulled.stdout)
    assert summary["digest"] == record["digest"]
    assert summary["bytes"] == record["size"]
    assert image_factory.client.images.get(ref).id == image_id
    assert image_factory.run(ref) == marker


def test_same_host_pull_needs_no_flags(registry_server, image_factory, docket_cli):
    ref, marker = image_factory.build(data_mib=1)
    docket_cli("push", ref, registry=registry_server)
    image_factory.remove(ref)
    docket_cli("pull", ref, "--seed-time", "0", registry=registry_server)  # no DOCKET_PEER_IP
    assert image_factory.run(ref) == marker


def test_pull_after_registry_restart(registry_server, image_factory, docket_cli):
    ref, marker = image_factory.build(data_mib=2)
    docket_cli("push", ref, registry=registry_server)
    registry_server.restart()
    assert any(r["ref"] == ref for r in images_json(docket_cli, registry_server))
    image_factory.remove(ref)
    docket_cli("pull", ref, "--seed-time", "0", registry=registry_server, peer_ip="127.0.0.10")
    assert image_factory.run(ref) == marker


def test_repush_tag_serves_new_content(registry_server, image_factory, docket_cli):
    ref, _ = image_factory.build(data_mib=1)
    docket_cli("push", ref, registry=registry_server)
    first = next(r for r in images_json(docket_cli, registry_server) if r["ref"] == ref)

    ref2, marker2 = image_factory.build(ref=ref, data_mib=1)  # same tag, new content
    docket_cli("push", ref2, registry=registry_server)
    second = next(r for r in images_json(docket_cli, registry_server) if r["ref"] == ref)
    assert second["digest"] != first["digest"]
    assert len([r for r in images_json(docket_cli, registry_server) if r["ref"] == ref]) == 1

    image_factory.remove(ref)
    docket_cli("pull", ref, "--seed-time", "0", registry=registry_server, peer_ip="127.0.0.11")
    assert image_factory.run(ref) == marker2


def test_pull_no_load_writes_loadable_tarball(registry_server, image_factory, docket_cli, tmp_path: Path):
    ref, marker = image_factory.build(data_mib=1)
    docket_cli("push", ref, registry=registry_server)
    image_factory.remove(ref)
    out = tmp_path / "image.tar"
    docket_cli("pull", ref, "--no-load", "-o", str(out), "--seed-time", "0", registry=registry_server,
               peer_ip="127.0.0.12")
    assert out.stat().st_size > 1024 * 1024
    with pytest.raises(Exception):
        image_factory.client.images.get(ref)  # --no-load loaded nothing
    with open(out, "rb") as f:
        image_factory.client.images.load(f)
    assert image_factory.run(ref) == marker
