"""End to end, layer distribution (docs/layers.md): two versions sharing a base layer cost only their app layer,
both on push and on pull. Real dockerd, docket-registry, opentracker and ctorrent.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path


from tests.support.tools import need



def _build(factory, tag: str, dockerfile: str, files: dict[str, bytes]) -> None:
    ctx = factory.workdir / uuid.uuid4().hex
    ctx.mkdir(parents=True)
    for name, data in files.items():
        (ctx / name).write_bytes(data)
    (ctx / "Dockerfile").write_text(dockerfile)
    factory.client.images.build(path=str(ctx), tag=tag, rm=True, forcerm=True)
    factory.built.append(tag)
    shutil.rmtree(ctx, ignore_errors=True)


def build_versions(factory) -> tuple[str, str, str]:
    """base:1 (busybox + 4 MiB), v1/v2 FROM base adding a different small /marker each."""
    name = f"docket-layers/{uuid.uuid4().hex[:8]}"
    base, v1, v2 = f"{name}-base:1", f"{name}:v1", f"{name}:v2"
    ctx = factory.workdir / uuid.uuid4().hex
    ctx.mkdir(parents=True)
    shutil.copy(need("busybox"), ctx / "busybox")
    (ctx / "data.bin").write_bytes(os.urandom(4 * 1024 * 1024))
    (ctx / "Dockerfile").write_text('FROM scratch\nCOPY busybox /bin/busybox\nCOPY data.bin /data.bin\n'
                                    'ENTRYPOINT ["/bin/busybox"]\n')
    factory.client.images.build(path=str(ctx), tag=base, rm=True, forcerm=True)
    factory.built.append(base)
    for ref in (v1, v2):
        _build(factory, ref, f"FROM {base}\nCOPY marker /marker\n", {"marker": f"{ref}\n".encode()})
    return base, v1, v2


def test_versions_share_the_base_layer(registry_server, image_factory, docket_cli, tmp_path: Path):
    base, v1, v2 = build_versions(image_factory)
    p1 = json.loads(docket_cli("push", "--json", v1, registry=registry_server).stdout)
    assert p1["layers"] == 3 and p1["layers_uploaded"] == 3  # busybox, data, app
    p2 = json.loads(docket_cli("push", "--json", v2, registry=registry_server).stdout)
    assert p2["layers"] == 3 and p2["layers_uploaded"] == 1  # only the app layer
    assert p2["bytes_uploaded"] < 64 * 1024 and p2["bytes_skipped"] > 4 * 1024 * 1024

    records = {r["ref"]: r for r in json.loads(docket_cli("images", "--json", registry=registry_server).stdout)}
    assert records[v1]["format"] == records[v2]["format"] == "layers"
    assert records[v1]["layers"][0]["digest"] == records[v2]["layers"][0]["digest"]
    ids = {ref: image_factory.client.images.get(ref).id for ref in (v1, v2)}

    for ref in (v1, v2, base):
        image_factory.remove(ref)
    second_host = tmp_path / "host2"
    s1 = json.loads(docket_cli("pull", "--json", "--seed-time", "0", v1, registry=registry_server,
                               peer_ip="127.0.0.31", location=second_host).stdout)
    # the busybox layer is byte-identical in every test image: another image may already hold it
    assert s1["layers_downloaded"] >= 2 and s1["layers_downloaded"] + s1["layers_present"] == 3
    assert s1["image_id"] == ids[v1]
    s2 = json.loads(docket_cli("pull", "--json", "--seed-time", "0", v2, registry=registry_server,
                               peer_ip="127.0.0.31", location=second_host).stdout)
    assert s2["layers"] == 3 and s2["layers_downloaded"] == 1 and s2["bytes_present"] > 4 * 1024 * 1024
    assert s2["bytes_from_peers"] < 64 * 1024
    assert image_factory.client.images.get(v2).id == ids[v2]
    assert image_factory.run(v1) == v1
    assert image_factory.run(v2) == v2


def test_output_tarball_has_every_layer_and_loads(registry_server, image_factory, docket_cli, tmp_path: Path):
    base, v1, _ = build_versions(image_factory)
    docket_cli("push", v1, registry=registry_server)
    out = tmp_path / "v1.tar"
    s = json.loads(docket_cli("pull", "--json", "--no-load", "-o", str(out), "--seed-time", "0", v1,
                              registry=registry_server, peer_ip="127.0.0.32").stdout)
    assert s["layers_downloaded"] == 3 and not s["loaded"]
    for ref in (v1, base):
        image_factory.remove(ref)
    with open(out, "rb") as f:
        image_factory.client.images.load(f)
    assert image_factory.run(v1) == v1
