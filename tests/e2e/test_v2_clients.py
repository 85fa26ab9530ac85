"""Stock clients against docket-registry's /v2 API (docs/v2.md), mixed with docket push/pull on the one store.

Real dockerd (`docker push`/`docker pull`: Docker treats loopback registries as insecure-allowed), skopeo (Debian
package) and the oras Python SDK, against a real registry process with its tracker and seeders.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import requests

from tests.support.procs import free_port
from tests.support.registry_server import RegistryServer
from tests.support.tools import docker_cli, need


TOKEN = "v2-test-token-0123456789abcdef"



def skopeo(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([need("skopeo"), "--insecure-policy", *args], capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"skopeo {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def docker_config(tmp_path: Path, docker_host: str) -> Path:
    path = tmp_path / "docker-config"
    path.mkdir()
    return path


def _host(server: RegistryServer) -> str:
    return f"127.0.0.1:{server.port}"


def test_docker_push_then_docker_pull_and_docket_pull(registry_server, image_factory, docket_cli, docker_config,
                                                      tmp_path: Path):
    """docker push -> docker pull round trip; the same image through docket pull over BitTorrent; listed."""
    ref, marker = image_factory.build(data_mib=3)
    remote = f"{_host(registry_server)}/v2test/app:v1"
    image_factory.client.images.get(ref).tag(remote)
    image_factory.built.append(remote)
    push = docker_cli("push", remote, config=docker_config)
    assert "digest: sha256:" in push.stdout
    pushed_digest = push.stdout.split("digest: ")[1].split()[0]

    record = requests.get(f"{registry_server.url}/api/v1/repositories/v2test/app/tags/v1", timeout=10).json()
    assert record["format"] == "layers" and record["digest"] == pushed_digest
    # docker push sends gzip layers: the blob digest is not the diff_id, and each layer is seeded
    assert all(layer["diff_id"] != layer["digest"] for layer in record["layers"])
    assert all(layer["info_hash"] for layer in record["layers"])

    image_id = image_factory.client.images.get(ref).id
    image_factory.remove(remote)
    image_factory.remove(ref)
    docker_cli("pull", remote, config=docker_config)
    assert image_factory.client.images.get(remote).id == image_id
    assert image_factory.run(remote) == marker

    image_factory.remove(remote)
    summary = json.loads(docket_cli("pull", "--json", "--seed-time", "0", "v2test/app:v1", registry=registry_server,
                                    peer_ip="127.0.0.41", location=tmp_path / "host2").stdout)
    image_factory.built.append("v2test/app:v1")
    assert summary["image_id"] == image_id
    assert summary["bytes_from_peers"] > 0
    assert image_factory.run("v2test/app:v1") == marker
    listed = json.loads(docket_cli("images", "--json", registry=registry_server).stdout)
    assert "v2test/app:v1" in {r["ref"] for r in listed}


def test_docket_push_then_docker_pull_and_skopeo_both_ways(registry_server, image_factory, docket_cli,
                                                          docker_config, tmp_path: Path):
    """docket push -> docker pull; skopeo copies it out to an OCI layout and back under a new name, which
    docket pull then fetches over BitTorrent."""
    ref, marker = image_factory.build(data_mib=2)
    image_id = image_factory.client.images.get(ref).id
    original_layers = image_factory.client.images.get(ref).attrs["RootFS"]["Layers"]
    pushed = json.loads(docket_cli("push", "--json", ref, registry=registry_server).stdout)
    repo, tag = ref.rsplit(":", 1)

    remote = f"{_host(registry_server)}/{ref}"
    image_factory.remove(ref)
    docker_cli("pull", remote, config=docker_config)
    image_factory.built.append(remote)
    assert image_factory.client.images.get(remote).id == image_id
    assert image_factory.run(remote) == marker
    manifest = requests.get(f"{registry_server.url}/v2/{repo}/manifests/{tag}", timeout=10,
                            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert manifest.status_code == 200 and manifest.headers["Docker-Content-Digest"] == pushed["digest"]

    layout = tmp_path / "oci-layout"
    skopeo("copy", "--src-tls-verify=false", f"docker://{remote}", f"oci:{layout}:copy")
    assert (layout / "index.json").is_file()
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:copy", f"docker://{_host(registry_server)}/skopeo/copy:v1")
    inspect = json.loads(skopeo("inspect", "--tls-verify=false",
                                f"docker://{_host(registry_server)}/skopeo/copy:v1").stdout)
    assert inspect["Name"].endswith("skopeo/copy")

    image_factory.remove(remote)
    summary = json.loads(docket_cli("pull", "--json", "--seed-time", "0", "skopeo/copy:v1", registry=registry_server,
                                    peer_ip="127.0.0.42", location=tmp_path / "host2").stdout)
    image_factory.built.append("skopeo/copy:v1")
    # skopeo rewrites the config for an OCI layout (so a new image id); the filesystem layers are the same
    copied = image_factory.client.images.get("skopeo/copy:v1")
    assert copied.attrs["RootFS"]["Layers"] == original_layers
    assert summary["image_id"] == copied.id
    assert image_factory.run("skopeo/copy:v1") == marker
    tags = requests.get(f"{registry_server.url}/v2/skopeo/copy/tags/list", timeout=10).json()
    assert tags == {"name": "skopeo/copy", "tags": ["v1"]}
    catalog = requests.get(f"{registry_server.url}/v2/_catalog", timeout=10).json()["repositories"]
    assert {repo, "skopeo/copy"} <= set(catalog)


def test_oras_artifact_with_subject_and_referrers(registry_server, docket_cli, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch):
    """An OCI artifact pushed and pulled with the oras SDK; a second one attached to it as its subject is
    listed by the referrers API; docket images lists the artifact, and docket pull refuses it clearly."""
    import oras.oci
    import oras.provider

    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("release notes\n")
    Path("sbom.json").write_text('{"packages": []}\n')
    target = f"{_host(registry_server)}/artifacts/notes:v1"
    reg = oras.provider.Registry(hostname=_host(registry_server), insecure=True)
    reg.push(target=target, files=["notes.txt"])
    out = tmp_path / "pulled"
    files = reg.pull(target=target, outdir=str(out))
    assert [Path(f).read_text() for f in files] == ["release notes\n"]

    head = requests.head(f"{registry_server.url}/v2/artifacts/notes/manifests/v1", timeout=10,
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert head.status_code == 200
    subject = oras.oci.Subject(mediaType=head.headers["Content-Type"], digest=head.headers["Docker-Content-Digest"],
                               size=int(head.headers["Content-Length"]))
    reg.push(target=f"{_host(registry_server)}/artifacts/notes:sbom", files=["sbom.json"], subject=subject)
    referrers = requests.get(f"{registry_server.url}/v2/artifacts/notes/referrers/{subject.digest}", timeout=10)
    assert referrers.status_code == 200
    assert referrers.headers["Content-Type"].startswith("application/vnd.oci.image.index.v1+json")
    listed = referrers.json()["manifests"]
    assert len(listed) == 1
    sbom = requests.get(f"{registry_server.url}/v2/artifacts/notes/manifests/sbom", timeout=10,
                        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert listed[0]["digest"] == sbom.headers["Docker-Content-Digest"]

    refs = {r["ref"]: r for r in json.loads(docket_cli("images", "--json", registry=registry_server).stdout)}
    assert refs["artifacts/notes:v1"]["format"] == "artifact"
    refused = docket_cli("pull", "artifacts/notes:v1", registry=registry_server, check=False)
    assert refused.returncode != 0 and "artifact" in (refused.stderr + refused.stdout).lower()


def test_docker_login_with_token(tmp_path: Path, image_factory, docker_config):
    """With push tokens configured, docker push needs `docker login` with the token as password; pulls stay open."""
    need("ctorrent")
    need("opentracker")
    server = RegistryServer(location=tmp_path / "registry", port=free_port(), tracker_port=free_port(),
                            log=tmp_path / "registry.log", extra_args=["--auth-token", TOKEN])
    server.start()
    try:
        ref, marker = image_factory.build(data_mib=1)
        remote = f"{_host(server)}/secure/app:v1"
        image_factory.client.images.get(ref).tag(remote)
        image_factory.built.append(remote)
        denied = docker_cli("push", remote, config=docker_config, check=False)
        assert denied.returncode != 0
        assert requests.get(f"{server.url}/v2/_catalog", timeout=10).json()["repositories"] == []

        bad = docker_cli("login", "-u", "ci", "--password-stdin", _host(server), config=docker_config, check=False)
        assert bad.returncode != 0  # empty password
        wrong = subprocess.run([need("docker"), "login", "-u", "ci", "--password-stdin", _host(server)],
                               input="not-the-token", capture_output=True, text=True, timeout=60,
                               env={**os.environ, "DOCKER_CONFIG": str(docker_config)})
        assert wrong.returncode != 0
        login = subprocess.run([need("docker"), "login", "-u", "ci", "--password-stdin", _host(server)],
                               input=TOKEN, capture_output=True, text=True, timeout=60,
                               env={**os.environ, "DOCKER_CONFIG": str(docker_config)})
        assert login.returncode == 0, login.stderr
        docker_cli("push", remote, config=docker_config)
        docker_cli("logout", _host(server), config=docker_config)
        image_factory.remove(remote)
        docker_cli("pull", remote, config=docker_config)  # reads need no token
        assert image_factory.run(remote) == marker
    finally:
        server.stop()
