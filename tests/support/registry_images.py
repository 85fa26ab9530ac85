"""Build small, real-shaped ``docker save`` tarballs in tests (Engine 20.10 legacy and Engine 25+ OCI layouts)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path


def _add(tar: tarfile.TarFile, name: str, data: bytes, **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    for k, v in fields.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data))


def layer_tar(payload: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        _add(t, "hello.txt", payload)
    return buf.getvalue()


def config_json(payload: bytes, created: str = "2024-05-06T07:08:09.123456789Z") -> bytes:
    diff_id = "sha256:" + hashlib.sha256(layer_tar(payload)).hexdigest()
    return json.dumps({
        "architecture": "amd64", "os": "linux", "created": created,
        "config": {"Cmd": ["/hello"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }, sort_keys=True).encode()


def build_image_tar(
    path: Path,
    *,
    layout: str = "docker",
    payload: bytes = b"hello docket\n",
    repo_tag: str = "test/app:v1",
    created: str = "2024-05-06T07:08:09.123456789Z",
    mutate: Callable[[tarfile.TarFile, dict], None] | None = None,
    manifest: object | None = None,
    skip: tuple[str, ...] = (),
) -> dict:
    """Write an image tarball; returns {"image_id", "config", "layers"}. ``mutate`` may add extra members."""
    layer = layer_tar(payload)
    config = config_json(payload, created)
    config_hex = hashlib.sha256(config).hexdigest()
    layer_hex = hashlib.sha256(layer).hexdigest()
    if layout == "oci":
        config_name, layer_name = f"blobs/sha256/{config_hex}", f"blobs/sha256/{layer_hex}"
    else:
        config_name, layer_name = f"{config_hex}.json", f"{layer_hex[:64]}/layer.tar"
    entry = {"Config": config_name, "RepoTags": [repo_tag], "Layers": [layer_name]}
    with tarfile.open(path, "w") as tar:
        if layout == "oci":
            oci_manifest = json.dumps({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": f"sha256:{config_hex}",
                           "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{layer_hex}",
                            "size": len(layer)}],
            }).encode()
            mhex = hashlib.sha256(oci_manifest).hexdigest()
            _add(tar, "blobs/", b"", type=tarfile.DIRTYPE, mode=0o755)
            _add(tar, "blobs/sha256/", b"", type=tarfile.DIRTYPE, mode=0o755)
            if layer_name not in skip:
                _add(tar, layer_name, layer)
            if config_name not in skip:
                _add(tar, config_name, config)
            _add(tar, f"blobs/sha256/{mhex}", oci_manifest)
            _add(tar, "index.json", json.dumps({"schemaVersion": 2, "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{mhex}",
                 "size": len(oci_manifest)}]}).encode())
            _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        else:
            _add(tar, f"{layer_hex}/", b"", type=tarfile.DIRTYPE, mode=0o755)
            if layer_name not in skip:
                _add(tar, layer_name, layer)
            _add(tar, f"{layer_hex}/VERSION", b"1.0")
            if config_name not in skip:
                _add(tar, config_name, config)
            repo, _, tag = repo_tag.rpartition(":")
            _add(tar, "repositories", json.dumps({repo: {tag: layer_hex}}).encode())
        if mutate is not None:
            mutate(tar, entry)
        if "manifest.json" not in skip:
            _add(tar, "manifest.json", json.dumps(manifest if manifest is not None else [entry]).encode())
    return {"image_id": f"sha256:{config_hex}", "config": config_name, "layers": [layer_name]}


def build_layered_image_tar(
    path: Path,
    payloads: list[bytes],
    *,
    layout: str = "docker",
    repo_tag: str = "test/app:v1",
    created: str = "2024-05-06T07:08:09Z",
    wrong_diff_id_at: int | None = None,
) -> dict:
    """A multi-layer image tarball (one file per layer). Legacy layout writes a repeated layer as a symlink to the
    first copy, as Engine 20.10 does; OCI lists the same blob twice. Returns {"image_id", "config" (bytes),
    "config_digest", "layers" (bytes per position), "diff_ids"}."""
    layers = [layer_tar(p) for p in payloads]
    diff_ids = ["sha256:" + hashlib.sha256(x).hexdigest() for x in layers]
    claimed = list(diff_ids)
    if wrong_diff_id_at is not None:
        claimed[wrong_diff_id_at] = "sha256:" + "e" * 64
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": created, "config": {"Cmd": ["/hello"]},
                         "rootfs": {"type": "layers", "diff_ids": claimed}}, sort_keys=True).encode()
    config_hex = hashlib.sha256(config).hexdigest()
    names: list[str] = []
    with tarfile.open(path, "w") as tar:
        if layout == "oci":
            _add(tar, "blobs/", b"", type=tarfile.DIRTYPE, mode=0o755)
            _add(tar, "blobs/sha256/", b"", type=tarfile.DIRTYPE, mode=0o755)
            written: set[str] = set()
            for data, diff_id in zip(layers, diff_ids):
                name = f"blobs/sha256/{diff_id[7:]}"
                if name not in written:
                    _add(tar, name, data)
                    written.add(name)
                names.append(name)
            config_name = f"blobs/sha256/{config_hex}"
            _add(tar, config_name, config)
            _add(tar, "index.json", b'{"schemaVersion": 2, "manifests": []}')
            _add(tar, "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        else:
            first: dict[str, str] = {}
            parent = ""
            for data, diff_id in zip(layers, diff_ids):
                v1 = hashlib.sha256((parent + diff_id).encode()).hexdigest()  # a v1 id per position, like Docker
                parent = v1
                _add(tar, f"{v1}/", b"", type=tarfile.DIRTYPE, mode=0o755)
                if diff_id in first:
                    _add(tar, f"{v1}/layer.tar", b"", type=tarfile.SYMTYPE, linkname=f"../{first[diff_id]}",
                         size=0)
                else:
                    _add(tar, f"{v1}/layer.tar", data)
                    first[diff_id] = f"{v1}/layer.tar"
                _add(tar, f"{v1}/VERSION", b"1.0")
                names.append(f"{v1}/layer.tar")
            config_name = f"{config_hex}.json"
            _add(tar, config_name, config)
        _add(tar, "manifest.json", json.dumps([{"Config": config_name, "RepoTags": [repo_tag],
                                                "Layers": names}]).encode())
    return {"image_id": f"sha256:{config_hex}", "config": config, "config_digest": f"sha256:{config_hex}",
            "layers": layers, "diff_ids": diff_ids}
