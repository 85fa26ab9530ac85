"""Unit tests of the layer client (docs/layers.md): chain ids, member classification, the generated
``docker load`` stream (read back by tarfile and loaded by a real dockerd), and the layer push against a small
in-memory fake of the registry's layer endpoints (no registry, no ctorrent).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from docket import errors
from docket.client.api import RegistryClient
from docket.client.dockerops import DockerOps
from docket.client.layers import (TarStream, chain_ids, classify_member, load_entries, present_prefix,
                                  stream_length, tar_stream)
from docket.client.records import LayeredRecord, check_config
from docket.client.push import LayerPusher
from docket.reference import Reference, parse_reference
from tests.support.fakes import FakeDocker, FakeRegistry, FakeTorrentProc, layer_puller, layer_tar, sha


# -- synthetic docker save tarballs ---------------------------------------------------------------------------


def save_tar(layers: list[bytes], layout: str = "legacy", dup_link: bool = False) -> tuple[bytes, str, list[str]]:
    """A `docker save`-like tarball; returns (bytes, image id, diff_ids)."""
    diff_ids = [sha(layer) for layer in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}, "created": "2024-01-01T00:00:00Z"}
                        ).encode()
    image_id = sha(config)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))

        if layout == "legacy":
            names = []
            for i, layer in enumerate(layers):
                v1 = hashlib.sha256(f"v1-{i}".encode()).hexdigest()
                names.append(f"{v1}/layer.tar")
                add(f"{v1}/json", b"{}")
                add(f"{v1}/VERSION", b"1.0")
                if dup_link and i > 0 and layer == layers[0]:
                    link = tarfile.TarInfo(f"{v1}/layer.tar")
                    link.type = tarfile.SYMTYPE
                    link.linkname = f"../{names[0]}"
                    t.addfile(link)
                else:
                    add(f"{v1}/layer.tar", layer)
            add(f"{image_id.split(':')[1]}.json", config)
            add("manifest.json", json.dumps([{"Config": f"{image_id.split(':')[1]}.json",
                                              "RepoTags": ["x:y"], "Layers": names}]).encode())
        else:
            add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add(f"blobs/sha256/{image_id.split(':')[1]}", config)
            for d, layer in dict(zip(diff_ids, layers)).items():
                add(f"blobs/sha256/{d.split(':')[1]}", layer)
            manifest = json.dumps({"config": {"digest": image_id}}).encode()
            add(f"blobs/sha256/{sha(manifest).split(':')[1]}", manifest)
            add("index.json", b"{}")
            add("manifest.json", json.dumps([{"Config": f"blobs/sha256/{image_id.split(':')[1]}",
                                              "Layers": [f"blobs/sha256/{d.split(':')[1]}" for d in diff_ids]}]
                                            ).encode())
    return buf.getvalue(), image_id, diff_ids


def chunked(data: bytes, n: int = 7000) -> Iterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i:i + n]


# -- pure functions -------------------------------------------------------------------------------------------

def test_chain_ids_formula():
    a, b, c = (sha(x) for x in (b"a", b"b", b"c"))
    ids = chain_ids([a, b, c])
    assert ids[0] == a
    assert ids[1] == "sha256:" + hashlib.sha256(f"{a} {b}".encode()).hexdigest()
    assert ids[2] == "sha256:" + hashlib.sha256(f"{ids[1]} {c}".encode()).hexdigest()
    assert present_prefix([a, b, c], {ids[1]}) == 2
    assert present_prefix([a, b, c], {b}) == 0  # b alone is not the chain a+b
    assert present_prefix([a, b, c], set()) == 0


@pytest.mark.parametrize("layout", ["legacy", "oci"])
def test_member_classification(layout):
    layers = [layer_tar({"a": b"1" * 100}), layer_tar({"b": b"2" * 300})]
    data, image_id, diff_ids = save_tar(layers, layout)
    kinds = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as t:
        for info in t:
            kinds[info.name] = classify_member(info, image_id, diff_ids)
    layer_members = [n for n, k in kinds.items() if k.kind == "layer"]
    config_members = [n for n, k in kinds.items() if k.kind == "config"]
    assert len(layer_members) == 2 and len(config_members) == 1
    if layout == "oci":
        assert sorted(kinds[n].digest for n in layer_members) == sorted(diff_ids)  # named by diff_id
        assert all(kinds[n].kind == "other" for n in ("index.json", "oci-layout", "manifest.json"))
    else:
        assert all(n.endswith("/layer.tar") and kinds[n].digest is None for n in layer_members)
        assert kinds[config_members[0]].digest == image_id


def _members_tarfile(data: bytes) -> list[tuple]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as t:
        for info in t:
            f = t.extractfile(info) if info.isreg() else None
            out.append((info.name, info.type, info.size, info.linkname, f.read() if f else None))
    return out


def _members_stream(data: bytes, step: int, read_every: int = 1) -> tuple[list[tuple], int]:
    out = []
    ts = TarStream(chunked(data, step), out_chunk=5000)
    for i, info in enumerate(ts):
        body = b"".join(ts.chunks(info)) if info.isreg() and i % read_every == 0 else None
        out.append((info.name, info.type, info.size, info.linkname, body))
    return out, ts.count


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("step", [1, 511, 512, 7000, 1 << 20])
def test_tar_stream_reads_what_tarfile_reads(fmt, step):
    """TarStream (the push's fast reader) sees the same members and bytes as tarfile, whatever the chunking."""
    buf = io.BytesIO()
    long = "d/" + "n" * 150 if fmt != tarfile.USTAR_FORMAT else "d/short"
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in [("a", b""), ("d/b", os.urandom(513)), (long, os.urandom(12_345)),
                           ("ü-name" if fmt == tarfile.PAX_FORMAT else "c", b"x" * 1024)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("dir")
        d.type = tarfile.DIRTYPE
        t.addfile(d)
        link = tarfile.TarInfo("link")
        link.type = tarfile.SYMTYPE
        link.linkname = "../" + "l" * 120 if fmt != tarfile.USTAR_FORMAT else "../x"
        t.addfile(link)
    data = buf.getvalue()
    expected = _members_tarfile(data)
    got, count = _members_stream(data, step)
    assert got == expected and count == len(data)
    skipped, _ = _members_stream(data, step, read_every=2)  # members whose data nobody reads are skipped
    assert [m[:4] for m in skipped] == [m[:4] for m in expected]


@pytest.mark.parametrize("data", [b"", b"x" * 100, b"garbage" * 200, bytes(512) * 2],
                         ids=["empty", "short", "garbage", "only-end-blocks"])
def test_tar_stream_garbage(data):
    with pytest.raises(tarfile.TarError):
        list(TarStream(chunked(data, 300)))


def test_tar_stream_truncated_member():
    data, _, _ = save_tar([layer_tar({"a": os.urandom(5000)})])
    ts = TarStream(chunked(data[:3000], 700))
    with pytest.raises(tarfile.ReadError):
        for info in ts:
            for _ in ts.chunks(info):
                pass


def test_push_of_a_garbage_export_is_invalid_image(fake_registry):
    data, image_id, diff_ids = save_tar([layer_tar({"a": b"a"})])
    with pytest.raises(errors.InvalidImage):
        _push(fake_registry, data[:1500] + b"garbage" * 100, image_id, diff_ids)


def test_layered_record_and_config_checks():
    layers = [layer_tar({"a": b"x"})]
    _, image_id, diff_ids = save_tar(layers)
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}, "created": "2024-01-01T00:00:00Z"}
                        ).encode()
    rec = {"digest": sha(b"m"), "image_id": image_id, "size": 10, "format": "layers",
           "config": {"digest": image_id, "size": len(config)},
           "layers": [{"digest": diff_ids[0], "size": len(layers[0]), "info_hash": "a" * 40}]}
    r = LayeredRecord.from_json(Reference("x", "y"), rec)
    assert check_config(r, config) == diff_ids
    with pytest.raises(errors.IntegrityError):
        check_config(r, config + b" ")
    bad = dict(rec, layers=[dict(rec["layers"][0], info_hash="zz")])
    with pytest.raises(errors.IntegrityError):
        LayeredRecord.from_json(Reference("x", "y"), bad)


def test_tar_stream_is_a_tar_with_exact_length(tmp_path):
    layers = [layer_tar({"a": os.urandom(5000)}), layer_tar({"b": os.urandom(70000)})]
    diff_ids = [sha(x) for x in layers]
    blobs = {}
    for d, data in zip(diff_ids, layers):
        p = tmp_path / d.split(":")[1]
        p.write_bytes(data)
        blobs[d] = p
    config = b'{"rootfs":{}}'
    cfg = sha(config)
    # only the second layer's file: the first is "present"
    entries = load_entries("team/app:v1", cfg, config, diff_ids, {diff_ids[1]: blobs[diff_ids[1]]})
    data = b"".join(tar_stream(entries, chunk=4096))
    assert len(data) == stream_length(entries) and len(data) % 10240 == 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
        names = t.getnames()
        manifest = json.loads(t.extractfile("manifest.json").read())
        assert t.extractfile(f"{diff_ids[1].split(':')[1]}/layer.tar").read() == layers[1]
        assert t.extractfile(f"{cfg.split(':')[1]}.json").read() == config
    assert f"{diff_ids[0].split(':')[1]}/layer.tar" not in names
    assert manifest == [{"Config": f"{cfg.split(':')[1]}.json", "RepoTags": ["team/app:v1"],
                         "Layers": [f"{d.split(':')[1]}/layer.tar" for d in diff_ids]}]


# -- push against the fake registry ---------------------------------------------------------------------------

def _push(reg: FakeRegistry, data: bytes, image_id: str, diff_ids: list[str], exports: list[int] | None = None):
    def export():
        if exports is not None:
            exports.append(1)
        return chunked(data)

    with RegistryClient("127.0.0.1", reg.port) as api:
        return LayerPusher(api).push(parse_reference("team/app:v1"), image_id, diff_ids, export, len(data))


@pytest.mark.parametrize("layout", ["legacy", "oci"])
def test_push_uploads_only_missing_layers(fake_registry, layout):
    base = layer_tar({"base": os.urandom(200_000)})
    v1 = save_tar([base, layer_tar({"app": os.urandom(3000)})], layout)
    app2 = layer_tar({"app": os.urandom(4000)})
    v2 = save_tar([base, app2], layout)
    r1 = _push(fake_registry, *v1)
    assert (r1.layers, r1.layers_uploaded) == (2, 2)
    assert [p["kind"] for p in fake_registry.posts].count("config") == 1
    fake_registry.posts.clear()
    r2 = _push(fake_registry, *v2)
    assert (r2.layers, r2.layers_uploaded) == (2, 1)
    assert r2.bytes_skipped == len(base)
    assert r2.bytes_uploaded == len(app2)
    assert [p["kind"] for p in fake_registry.posts] == ["layer", "config"]
    r3 = _push(fake_registry, *v2)  # everything there: nothing uploaded
    assert r3.layers_uploaded == 0 and r3.digest == r2.digest
    assert r2.digest == sha(json.dumps({"config": v2[1], "layers": v2[2]}, separators=(",", ":"),
                                       sort_keys=True).encode())


def test_push_size_collision_takes_a_second_pass(fake_registry):
    a = layer_tar({"a": os.urandom(10_000)})
    b = layer_tar({"b": os.urandom(10_000)})  # same tar size as a, other content
    assert len(a) == len(b)
    data, image_id, diff_ids = save_tar([a, b])
    fake_registry.blobs[sha(a)] = a  # the registry has a only
    exports: list[int] = []
    res = _push(fake_registry, data, image_id, diff_ids, exports)
    assert len(exports) == 2  # b was hashed and dropped (size of a), then uploaded in pass two
    assert res.layers_uploaded == 1 and res.bytes_uploaded == len(b)
    assert fake_registry.posts[0] == {"kind": "layer", "digest": sha(b), "size": len(b), "given": sha(b)}
    assert sha(b) in fake_registry.blobs


def test_push_duplicate_layer_links_are_skipped(fake_registry):
    a = layer_tar({"a": os.urandom(1000)})
    data, image_id, diff_ids = save_tar([a, layer_tar({"b": b"b"}), a], dup_link=True)
    res = _push(fake_registry, data, image_id, diff_ids)
    assert res.layers == 2 and res.layers_uploaded == 2
    assert [p["kind"] for p in fake_registry.posts].count("layer") == 2


def test_push_refuses_a_tampered_export(fake_registry):
    data, image_id, diff_ids = save_tar([layer_tar({"a": b"a"})])
    with pytest.raises(errors.InvalidImage):
        _push(fake_registry, data, image_id, [sha(b"other")])


# -- with a real dockerd --------------------------------------------------------------------------------------

def _build(client, ctx: Path, tag: str, dockerfile: str, files: dict[str, bytes]) -> Any:
    ctx.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (ctx / name).write_bytes(data)
        (ctx / name).chmod(0o755)
    (ctx / "Dockerfile").write_text(dockerfile)
    image, _ = client.images.build(path=str(ctx), tag=tag, rm=True, forcerm=True)
    return image


@pytest.fixture
def two_images(docker_client, tmp_path):
    """base (busybox + data) and child FROM base with one more layer."""
    tag = os.urandom(4).hex()
    base_ref, child_ref = f"docket-layers-test/base:{tag}", f"docket-layers-test/child:{tag}"
    busybox = Path("/bin/busybox").read_bytes()
    _build(docker_client, tmp_path / "b", base_ref,
           "FROM scratch\nCOPY busybox /bin/busybox\nCOPY data /data\nENTRYPOINT [\"/bin/busybox\"]\n",
           {"busybox": busybox, "data": os.urandom(300_000)})
    _build(docker_client, tmp_path / "c", child_ref, f"FROM {base_ref}\nCOPY marker /marker\n",
           {"marker": b"child-marker\n"})
    yield base_ref, child_ref
    for ref in (child_ref, base_ref):
        try:
            docker_client.images.remove(ref, force=True)
        except Exception:  # noqa: BLE001 - best effort
            pass


def test_chain_ids_match_the_daemons_layer_store(docker_client, two_images):
    """The daemon keeps each layer under layerdb/sha256/<chain id>: ours must name existing directories."""
    _, child_ref = two_images
    diff_ids = docker_client.images.get(child_ref).attrs["RootFS"]["Layers"]
    ids = chain_ids(diff_ids)
    assert len(ids) == 3 and ids[0] == diff_ids[0]
    root = Path(docker_client.info()["DockerRootDir"]) / "image" / docker_client.info()["Driver"] / "layerdb"
    if not root.is_dir():
        pytest.skip(f"cannot see the daemon's layer store at {root}")
    for cid in ids:
        assert (root / "sha256" / cid.split(":")[1]).is_dir(), cid
    assert set(ids) <= DockerOps(docker_client).local_chain_ids()


def test_generated_stream_loads_with_only_the_missing_layer(docker_client, two_images, tmp_path):
    base_ref, child_ref = two_images
    child = docker_client.images.get(child_ref)
    diff_ids = child.attrs["RootFS"]["Layers"]
    data = b"".join(child.save(named=True))
    blobs: dict[str, Path] = {}
    config = b""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as t:
        for info in t:
            kind = classify_member(info, child.id, diff_ids)
            if kind.kind == "layer":
                body = t.extractfile(info).read()
                p = tmp_path / sha(body).split(":")[1]
                p.write_bytes(body)
                blobs[sha(body)] = p
            elif kind.kind == "config":
                config = t.extractfile(info).read()
    assert set(blobs) == set(diff_ids) and sha(config) == child.id
    docker_client.images.remove(child_ref, force=True)  # base stays: its chain ids are present
    ops = DockerOps(docker_client)
    top = {diff_ids[-1]: blobs[diff_ids[-1]]}
    entries = load_entries(child_ref, child.id, config, diff_ids, top)
    assert ops.load_stream(tar_stream(entries), parse_reference(child_ref), child.id) == child.id
    out = docker_client.containers.run(child_ref, ["cat", "/marker"], remove=True, network_mode="none")
    assert out == b"child-marker\n"


# -- layer pull orchestration with a scripted ctorrent --------------------------------------------------------


def serve_layered(reg: FakeRegistry, tmp_path: Path, layers: list[bytes]) -> tuple[str, list[str], dict[str, bytes]]:
    from docket.torrent.metainfo import build_torrent

    diff_ids = [sha(x) for x in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    image_id = sha(config)
    reg.blobs[image_id] = config
    entries = []
    by_hex = {}
    for d, data in zip(diff_ids, layers):
        f = tmp_path / "src" / d.split(":")[1]
        f.parent.mkdir(exist_ok=True)
        f.write_bytes(data)
        meta = build_torrent(f, "http://127.0.0.1:6969/announce", out=tmp_path / "src" / f"{f.name}.torrent")
        reg.extra[f"/api/v1/blobs/{d}/torrent"] = (tmp_path / "src" / f"{f.name}.torrent").read_bytes()
        entries.append({"digest": d, "size": len(data), "info_hash": meta.info_hash, "piece_length": 1})
        by_hex[f.name] = data
    rec = {"repository": "team/app", "tag": "v1", "ref": "team/app:v1", "image_id": image_id, "format": "layers",
           "digest": sha(b"manifest"), "size": len(config) + sum(map(len, layers)),
           "config": {"digest": image_id, "size": len(config)}, "layers": entries}
    reg.extra["/api/v1/repositories/team/app/tags/v1"] = json.dumps(rec).encode()
    FakeTorrentProc.instances.clear()
    return image_id, diff_ids, by_hex


def test_layer_pull_downloads_only_missing_layers_and_loads_them(fake_registry, tmp_path):
    base, app = layer_tar({"base": os.urandom(50_000)}), layer_tar({"app": os.urandom(3_000)})
    image_id, diff_ids, by_hex = serve_layered(fake_registry, tmp_path, [base, app])
    docker = FakeDocker(set(chain_ids(diff_ids[:1])))  # the base is already in Docker
    res = layer_puller(fake_registry, tmp_path, by_hex, docker, seed_time=5).pull(Reference("team/app", "v1"))
    s = res.summary()
    assert s["layers"] == 2 and s["layers_downloaded"] == 1 and s["bytes_present"] == len(base)
    assert s["bytes_from_peers"] == len(app) and s["bytes_from_registry"] > 0 and s["loaded"]
    (proc,) = FakeTorrentProc.instances
    assert Path(proc.kw["save_as"]).name == diff_ids[1].split(":")[1]
    with tarfile.open(fileobj=io.BytesIO(docker.loaded), mode="r:") as t:
        files = [n for n in t.getnames() if n.endswith("layer.tar")]
    assert files == [f"{diff_ids[1].split(':')[1]}/layer.tar"]


def test_layer_pull_output_has_every_layer_and_checks_digests(fake_registry, tmp_path):
    layers = [layer_tar({"a": os.urandom(20_000)}), layer_tar({"b": os.urandom(2_000)})]
    image_id, diff_ids, by_hex = serve_layered(fake_registry, tmp_path, layers)
    out = tmp_path / "img.tar"
    res = layer_puller(fake_registry, tmp_path, by_hex, None, load=False, output=out, seed_time=0).pull(
        Reference("team/app", "v1"))
    assert res.output == str(out) and res.summary()["layers_downloaded"] == 2
    with tarfile.open(out) as t:
        for d, data in zip(diff_ids, layers):
            assert t.extractfile(f"{d.split(':')[1]}/layer.tar").read() == data
    # a corrupt blob on the wire is refused and deleted
    for k in by_hex:
        by_hex[k] = b"x" * len(by_hex[k])
    with pytest.raises(errors.IntegrityError):
        layer_puller(fake_registry, tmp_path / "other", by_hex, None, load=False, seed_time=0).pull(
            Reference("team/app", "v1"))
