"""Attacks on the registry's storage (issue 11, "Data loss and denial of service"): a lost, emptied, damaged,
locked or read-only database, orphan blob files, and a full disk (tmpfs mounts as root), against real
docket-registry processes. Every case checks that the bytes under blobs/ are unchanged (names and sha256), that a
refusal to start is one ``docket-registry: error:`` line with a hint and no traceback, and that a full disk is a
JSON 507 in each API's error shape with nothing half-committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.procs import free_port, port_open, stop_process, wait_until
from tests.support.registry_server import RegistryServer
from tests.support.robustness_rows import record
from tests.support.tools import need

AREA = "storage"


# -- helpers ------------------------------------------------------------------------------------------------------
def _server(tmp: Path, location: Path, *extra: str, name: str = "registry") -> RegistryServer:
    need("ctorrent")
    need("opentracker")
    return RegistryServer(location=location, port=free_port(), tracker_port=free_port(), log=tmp / f"{name}.log",
                          extra_args=list(extra))


def _blob_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _push(url: str, repo: str, tag: str, layers: list[bytes]) -> tuple[str, list[str]]:
    """An image through /api/v1 (layer blobs, config blob, manifest); returns (config digest, layer digests)."""
    digests = []
    for layer in layers:
        d = _blob_digest(layer)
        r = requests.post(f"{url}/api/v1/blobs", params={"kind": "layer", "digest": d}, data=layer, timeout=60)
        assert r.status_code in (200, 201), r.text
        digests.append(d)
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": digests}}).encode()
    cd = _blob_digest(config)
    r = requests.post(f"{url}/api/v1/blobs", params={"kind": "config", "digest": cd}, data=config, timeout=60)
    assert r.status_code in (200, 201), r.text
    r = requests.put(f"{url}/api/v1/repositories/{repo}/manifests/{tag}", json={"config": cd, "layers": digests},
                     timeout=60)
    assert r.status_code == 201, r.text
    return cd, digests


def _snapshot(location: Path) -> dict[str, str]:
    """Every file under blobs/ -> its sha256."""
    root = location / "blobs"
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _remove_db(location: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (location / f"docket.db{suffix}").unlink(missing_ok=True)


def _start_fails(server: RegistryServer, timeout: float = 90) -> tuple[int, str]:
    """Run the registry to completion (it must refuse to start); returns (exit code, stderr)."""
    result = subprocess.run(server.args(), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stderr


def _assert_one_line_error(rc: int, stderr: str, *needles: str) -> str:
    assert rc != 0, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("docket-registry: error:")]
    assert len(errors) == 1, stderr
    line = errors[0]
    assert any(line2.startswith("  hint: ") for line2 in stderr.splitlines()), stderr
    for needle in needles:
        assert needle in line, line
    return line


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (as root), always unmounted."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(directory: Path, leave: int, name: str = "filler") -> Path:
    """A filler file that leaves about ``leave`` bytes free on ``directory``'s file system (0: completely full)."""
    filler = directory / name
    with open(filler, "wb") as f:
        chunk = b"\xa5" * (64 * 1024)
        try:
            while shutil.disk_usage(directory).free > leave:
                f.write(chunk[: max(4096, min(len(chunk), shutil.disk_usage(directory).free - leave))])
                f.flush()
        except OSError:
            pass  # ENOSPC: as full as it gets
    return filler


def _health(server: RegistryServer) -> tuple[int, dict]:
    r = requests.get(f"{server.url}/healthz", timeout=10)
    return r.status_code, r.json()


def _serving(server: RegistryServer) -> bool:
    return port_open("127.0.0.1", server.port) and requests.get(f"{server.url}/healthz", timeout=10).status_code > 0


def _chunked(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    """A body sent with Transfer-Encoding: chunked (no Content-Length: the registry cannot check the size first)."""
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _assert_v1_507(r: requests.Response) -> dict:
    assert r.status_code == 507, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["code"] == "INSUFFICIENT_STORAGE", err
    assert "space" in err["message"] or "full" in err["message"], err
    return err


def _assert_v2_507(r: requests.Response) -> dict:
    assert r.status_code == 507, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"errors"} and len(body["errors"]) == 1, body
    err = body["errors"][0]
    assert err["code"] == "INSUFFICIENT_STORAGE" and isinstance(err["message"], str), err
    assert "space" in err["message"] or "full" in err["message"], err
    return err


def _uploads_files(location: Path) -> list[str]:
    return sorted(p.name for p in (location / "uploads").iterdir() if not p.name.startswith(".probe-"))


# -- a lost or damaged database ------------------------------------------------------------------------------------
@pytest.fixture
def pushed(tmp_path: Path) -> Iterator[tuple[RegistryServer, dict[str, str], tuple[str, list[str]]]]:
    """A stopped registry whose location holds one pushed image (two layers), its blob snapshot and digests."""
    server = _server(tmp_path, tmp_path / "registry")
    server.start()
    try:
        digests = _push(server.url, "app", "v1", [os.urandom(300_000), os.urandom(200_000)])
    finally:
        server.stop()
    snapshot = _snapshot(server.location)
    assert len(snapshot) == 4  # two layers, config, the schema 2 manifest docket wrote
    yield server, snapshot, digests


def test_lost_database_refuses_to_start_and_keeps_every_blob(pushed, tmp_path: Path) -> None:
    server, snapshot, _ = pushed
    backup = tmp_path / "docket.db.bak"
    shutil.copy(server.location / "docket.db", backup)
    for case, damage in (("deleted", lambda p: _remove_db(server.location)),
                         ("emptied (0 bytes)", lambda p: os.truncate(p, 0))):
        shutil.copy(backup, server.location / "docket.db")
        damage(server.location / "docket.db")
        rc, stderr = _start_fails(server)
        line = _assert_one_line_error(rc, stderr, "has no record of any blob, but 4 blob file(s)",
                                      "nothing was deleted")
        assert "--adopt-orphans" in stderr
        assert _snapshot(server.location) == snapshot, f"blobs changed after a start with the database {case}"
        record(AREA, f"database {case}, blobs present, registry restarted",
               f"refuses to start, exit {rc}: "
               f"{line.split(': ', 2)[-1].replace(str(server.location), '<location>')[:120]}...; every blob kept")
    _remove_db(server.location)
    shutil.copy(backup, server.location / "docket.db")  # the hint's first way out: restore the backup
    server.start()
    try:
        r = requests.get(f"{server.url}/api/v1/repositories/app/tags/v1", timeout=10)
        assert r.status_code == 200 and r.json()["layers"], r.text
        assert _health(server)[0] == 200
    finally:
        server.stop()
    assert _snapshot(server.location) == snapshot


def test_damaged_database_is_one_line_error_not_500s(pushed, tmp_path: Path) -> None:
    server, snapshot, _ = pushed
    db = server.location / "docket.db"
    backup = tmp_path / "docket.db.bak"
    shutil.copy(db, backup)
    pages = os.path.getsize(backup) // 4096
    assert pages >= 6, pages

    def zero_middle_page(p: Path) -> None:
        with open(p, "r+b") as f:
            f.seek(pages // 2 * 4096)
            f.write(b"\0" * 4096)

    def zero_header(p: Path) -> None:
        with open(p, "r+b") as f:
            f.write(b"\0" * 100)

    cases = (("truncated to half its size", lambda p: os.truncate(p, os.path.getsize(p) // 2), "malformed"),
             ("a zeroed page in the middle", zero_middle_page, "damaged"),
             ("a zeroed header", zero_header, "not a database"))
    for case, damage, needle in cases:
        _remove_db(server.location)
        shutil.copy(backup, db)
        damage(db)
        rc, stderr = _start_fails(server)
        line = _assert_one_line_error(rc, stderr, needle, str(db))
        assert "restore it from a backup" in stderr, stderr
        assert _snapshot(server.location) == snapshot
        record(AREA, f"database file {case}", f"refuses to start, exit {rc}, one line: "
               f"{line.split(': ', 2)[-1].replace(str(db), 'docket.db')[:110]}; blobs kept")

    # locked by another process for longer than the busy timeout (another registry, a stuck sqlite3 shell)
    _remove_db(server.location)
    shutil.copy(backup, db)
    holder = sqlite3.connect(db, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        rc, stderr = _start_fails(server)
    finally:
        holder.close()
    line = _assert_one_line_error(rc, stderr, "database is locked")
    assert "another process" in stderr
    assert _snapshot(server.location) == snapshot
    record(AREA, "database locked by another process at start-up",
           f"refuses to start after the 10 s busy timeout, exit {rc}: 'database is locked' with a hint")

    # the database on a read-only file system (--db elsewhere), and a read-only location
    with _tmpfs(tmp_path / "ro", "4m") as ro:
        shutil.copy(backup, ro / "docket.db")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        readonly_db = _server(tmp_path, server.location, "--db", f"sqlite:///{ro}/docket.db", name="ro-db")
        rc, stderr = _start_fails(readonly_db)
        _assert_one_line_error(rc, stderr, "cannot use the database")
        assert "writable" in stderr
        assert _snapshot(server.location) == snapshot
        readonly_location = _server(tmp_path, ro, name="ro-location")
        rc2, stderr2 = _start_fails(readonly_location)
        _assert_one_line_error(rc2, stderr2, "not writable")
    record(AREA, "database (--db) or location on a read-only file system",
           f"refuses to start, exit {rc} / {rc2}, one line naming the file or directory and a hint")

    # restored: it starts and serves again
    _remove_db(server.location)
    shutil.copy(backup, db)
    server.start()
    try:
        assert requests.get(f"{server.url}/api/v1/repositories/app/tags/v1", timeout=10).status_code == 200
    finally:
        server.stop()


def test_adopt_orphans_registers_lost_blobs_and_keeps_them(pushed, tmp_path: Path) -> None:
    server, snapshot, (config, layers) = pushed
    _remove_db(server.location)
    adopting = _server(tmp_path, server.location, "--adopt-orphans", name="adopt")
    adopting.start()
    try:
        status, health = _health(adopting)
        assert status == 200 and health["checks"]["blob_store"]["blobs"] == 4, health
        assert health["checks"]["seeders"]["alive"] == 2, health  # the layers are seeded again
        for digest in [config, *layers]:
            r = requests.get(f"{adopting.url}/v2/app/blobs/{digest}", timeout=10)
            assert r.status_code == 200 and _blob_digest(r.content) == digest
        # the tag is gone with the database; pushing its manifest again needs no blob upload
        assert requests.get(f"{adopting.url}/api/v1/repositories/app/tags/v1", timeout=10).status_code == 404
        r = requests.put(f"{adopting.url}/api/v1/repositories/app/manifests/v1",
                         json={"config": config, "layers": layers}, timeout=30)
        assert r.status_code == 201, r.text
        with sqlite3.connect(server.location / "docket.db") as c:
            kinds = dict(c.execute("SELECT digest, kind FROM blobs").fetchall())
        assert kinds[config] == "config" and all(kinds[d] == "layer" for d in layers), kinds
    finally:
        adopting.stop()
    assert _snapshot(server.location) == snapshot
    record(AREA, "database deleted, registry started with --adopt-orphans",
           "every blob registered again (kinds from their bytes: layers seeded, config), none deleted; "
           "re-pushing the manifest re-creates the tag without re-uploading blobs")


def test_few_orphans_are_adopted_many_refuse_start(pushed, tmp_path: Path) -> None:
    """A push interrupted between placing its blob file and committing the row leaves one orphan: it is kept
    (adopted, unreferenced). Seventeen unknown files beside a database that knows others mean the database was
    replaced (an old backup): refuse."""
    server, snapshot, _ = pushed
    blobs = server.location / "blobs" / "sha256"
    interrupted = os.urandom(50_000)
    (blobs / _blob_digest(interrupted)[7:]).write_bytes(interrupted)
    server.start()
    try:
        r = requests.head(f"{server.url}/v2/app/blobs/{_blob_digest(interrupted)}", timeout=10)
        assert r.status_code == 200
    finally:
        server.stop()
    assert (blobs / _blob_digest(interrupted)[7:]).read_bytes() == interrupted
    with sqlite3.connect(server.location / "docket.db") as c:
        row = c.execute("SELECT unreferenced_at FROM blobs WHERE digest = ?", (_blob_digest(interrupted),)).fetchone()
    assert row is not None and row[0] is not None  # unreferenced: GC reclaims it after the grace period
    for _ in range(17):
        data = os.urandom(1000)
        (blobs / _blob_digest(data)[7:]).write_bytes(data)
    before = _snapshot(server.location)
    rc, stderr = _start_fails(server)
    _assert_one_line_error(rc, stderr, "knows 5 blob(s), but 17 blob file(s)")
    assert _snapshot(server.location) == before
    record(AREA, "one blob file without a row (push interrupted) / 17 of them (database replaced by an old backup)",
           f"one: adopted as unreferenced, kept; 17: refuses to start, exit {rc}, nothing deleted")


def test_second_registry_on_the_same_location_is_refused(tmp_path: Path) -> None:
    """Its start-up would empty uploads/ under the first one's pushes and stop the first one's seeders."""
    first = _server(tmp_path, tmp_path / "registry", name="first")
    first.start()
    try:
        digests = _push(first.url, "app", "v1", [os.urandom(200_000)])
        before = _snapshot(first.location)
        seeders = first.health()["checks"]["seeders"]["seeders"]
        session = requests.post(f"{first.url}/v2/app/blobs/uploads/", timeout=10)  # a push in progress
        assert session.status_code == 202
        requests.patch(first.url + session.headers["Location"], data=b"x" * 1000, timeout=10).raise_for_status()
        second = _server(tmp_path, first.location, name="second")
        rc, stderr = _start_fails(second)
        _assert_one_line_error(rc, stderr, "is in use by another docket-registry", f"pid {first.proc.pid}")
        status, health = _health(first)
        assert status == 200 and health["checks"]["seeders"]["seeders"].keys() == seeders.keys(), health
        assert all(health["checks"]["seeders"]["seeders"][d]["pid"] == seeders[d]["pid"] for d in seeders)
        r = requests.get(first.url + session.headers["Location"], timeout=10)
        assert r.status_code == 204 and r.headers["Range"] == "0-999"  # the upload in progress is intact
        assert _snapshot(first.location) == before
        assert requests.get(f"{first.url}/v2/app/blobs/{digests[0]}", timeout=10).status_code == 200
    finally:
        first.stop()
    record(AREA, "a second docket-registry started on the same --location",
           f"refuses to start, exit {rc}: 'in use by another docket-registry (pid N)'; the first one's seeders, "
           "upload sessions and blobs untouched")


def test_database_locked_while_serving_is_503_and_leaves_no_file(tmp_path: Path) -> None:
    """A write lock held past the busy timeout (another process on the database): the upload answers 503 in the
    API's shape (not a 500), and its blob file, already moved into blobs/, is removed again."""
    server = _server(tmp_path, tmp_path / "registry", "--no-seeding")
    server.start()
    try:
        holder = sqlite3.connect(server.location / "docket.db", isolation_level=None, timeout=30)
        try:
            holder.execute("BEGIN IMMEDIATE")
            data = os.urandom(100_000)
            d = _blob_digest(data)
            r = requests.post(f"{server.url}/v2/app/blobs/uploads/", params={"digest": d}, data=data, timeout=60)
        finally:
            holder.close()
        assert r.status_code == 503, r.text
        err = r.json()["errors"][0]
        assert "database" in err["message"] and "busy" in err["message"], err
        assert not (server.location / "blobs" / "sha256" / d[7:]).exists()
        r = requests.post(f"{server.url}/v2/app/blobs/uploads/", params={"digest": d}, data=data, timeout=60)
        assert r.status_code == 201, r.text
    finally:
        server.stop()
    record(AREA, "database write-locked by another process while a blob is uploaded",
           "after the 10 s busy timeout: 503 'database is busy' in the /v2 shape; the placed file removed again; "
           "the retry succeeds")


# -- a full disk ---------------------------------------------------------------------------------------------------
def test_full_disk_is_507_and_health_degraded(tmp_path: Path, docket_cli, image_factory, docker_client) -> None:
    """Below --min-free-space: uploads with a known size are refused before a byte is written (507 in each API's
    shape), /healthz is 503 naming the free space; freeing space brings both back."""
    with _tmpfs(tmp_path / "fs", "48m") as location:
        server = _server(tmp_path, location, "--min-free-space", "16MiB")
        server.start()
        filler = None
        try:
            _push(server.url, "app", "v1", [os.urandom(1_000_000)])
            status, health = _health(server)
            assert status == 200 and health["checks"]["disk_space"]["ok"], health
            ref, _ = image_factory.build(data_mib=2)
            tarball = b"".join(docker_client.api.get_image(ref))
            before = _snapshot(location)
            filler = _fill(location, 10 * 1024 * 1024)

            status, health = _health(server)
            assert status == 503 and health["status"] == "degraded", health
            disk = health["checks"]["disk_space"]
            assert not disk["ok"] and disk["free_bytes"] < 16 * 1024**2 and "--min-free-space" in disk["error"], disk

            data = os.urandom(1_000_000)
            d = _blob_digest(data)
            _assert_v1_507(requests.post(f"{server.url}/api/v1/blobs", params={"kind": "layer", "digest": d},
                                         data=data, timeout=30))
            err = _assert_v2_507(requests.post(f"{server.url}/v2/app/blobs/uploads/", params={"digest": d},
                                               data=data, timeout=30))
            session = requests.post(f"{server.url}/v2/app/blobs/uploads/", timeout=10)
            assert session.status_code == 202
            _assert_v2_507(requests.patch(server.url + session.headers["Location"], data=data, timeout=30))
            _assert_v1_507(requests.put(f"{server.url}/api/v1/repositories/app/tags/whole", data=tarball,
                                        headers={"Content-Type": "application/x-tar"}, timeout=60))
            push = docket_cli("push", ref, registry=server, check=False)
            assert push.returncode == 10, (push.returncode, push.stdout, push.stderr)
            assert "free space" in push.stderr and "Traceback" not in push.stderr, push.stderr
            tag = ref.split(":")[0]
            assert requests.get(f"{server.url}/api/v1/repositories/{tag}/tags/v1", timeout=10).status_code == 404
            assert requests.get(f"{server.url}/api/v1/repositories/app/tags/whole", timeout=10).status_code == 404
            assert _snapshot(location) == before
            assert [n for n in _uploads_files(location) if not n.startswith("session-")] == []
            # reads go on below the threshold
            assert requests.get(f"{server.url}/api/v1/repositories/app/tags/v1", timeout=10).status_code == 200
            record(AREA, "free space below --min-free-space (push: docket push, /api/v1 blob and tarball, /v2 "
                   "monolithic and PATCH)", f"507 INSUFFICIENT_STORAGE before any write (/v2: spec error shape: "
                   f"{err['message'][:60]}...); docket push exit 10; /healthz 503 'disk_space'; nothing stored")

            filler.unlink()
            filler = None
            status, health = _health(server)
            assert status == 200 and health["checks"]["disk_space"]["ok"], health
            docket_cli("push", ref, registry=server)
            assert requests.get(f"{server.url}/api/v1/repositories/{tag}/tags/v1", timeout=10).status_code == 200
            record(AREA, "space freed again", "/healthz 200 at once, the same docket push succeeds")
        finally:
            server.stop()
            if filler is not None:
                filler.unlink(missing_ok=True)


def test_disk_full_mid_write_is_507_and_nothing_half_committed(tmp_path: Path) -> None:
    """--min-free-space 0 and bodies without Content-Length: the disk fills while the bytes are written (ENOSPC),
    in every upload path; each answers 507 and leaves no partial file, no session bytes, no tag."""
    with _tmpfs(tmp_path / "fs", "40m") as location:
        server = _server(tmp_path, location, "--min-free-space", "0", "--no-seeding")
        server.start()
        filler = None
        try:
            config, layers = _push(server.url, "app", "v1", [os.urandom(500_000)])
            before = _snapshot(location)
            filler = _fill(location, 2 * 1024 * 1024)
            big = os.urandom(6 * 1024 * 1024)
            d = _blob_digest(big)

            _assert_v1_507(requests.post(f"{server.url}/api/v1/blobs", params={"kind": "layer", "digest": d},
                                         data=_chunked(big), timeout=60))
            _assert_v2_507(requests.post(f"{server.url}/v2/app/blobs/uploads/", params={"digest": d},
                                         data=_chunked(big), timeout=60))
            session = requests.post(f"{server.url}/v2/app/blobs/uploads/", timeout=10)
            assert session.status_code == 202
            upload_url = server.url + session.headers["Location"]
            _assert_v2_507(requests.patch(upload_url, data=_chunked(big), timeout=60))
            status = requests.get(upload_url, timeout=10)
            assert status.status_code == 204 and status.headers["Range"] == "0-0"  # the chunk left no bytes
            sessions = [location / "uploads" / n for n in _uploads_files(location)]
            assert len(sessions) == 1 and sessions[0].stat().st_size == 0, sessions
            assert requests.delete(upload_url, timeout=10).status_code == 204
            assert _uploads_files(location) == []
            assert _snapshot(location) == before
            record(AREA, "disk fills during an upload without Content-Length (/api/v1 blob, /v2 monolithic, /v2 "
                   "PATCH)", "507 INSUFFICIENT_STORAGE in each API's shape; no partial file in blobs/ or uploads/, "
                   "the session keeps its last complete size")

            # a layer that fills the disk to the last page: its bytes fit, its torrent (or row) does not
            exact = os.urandom(shutil.disk_usage(location).free)
            _assert_v1_507(requests.post(f"{server.url}/api/v1/blobs", params={"kind": "layer"},
                                         data=_chunked(exact), timeout=60))
            assert not (location / "blobs" / "sha256" / _blob_digest(exact)[7:]).exists()
            assert not (location / "torrents" / f"{_blob_digest(exact)[7:]}.torrent").exists()
            assert _uploads_files(location) == [] and _snapshot(location) == before
            assert requests.head(f"{server.url}/api/v1/blobs/{_blob_digest(exact)}", timeout=10).status_code == 404
            record(AREA, "a layer whose bytes fit exactly but whose torrent and row do not",
                   "507; the blob file already moved into blobs/ is removed again (no file without a row)")

            # completely full: health degraded; a manifest (the tag's commit) fails whole
            filler2 = _fill(location, 0, "filler2")
            status_code, health = _health(server)
            assert status_code == 503 and health["checks"]["disk_space"]["error"].startswith("no free space"), health
            r = requests.put(f"{server.url}/api/v1/repositories/app/manifests/v2",
                             json={"config": config, "layers": layers}, timeout=30)
            _assert_v1_507(r)
            assert requests.get(f"{server.url}/api/v1/repositories/app/tags/v2", timeout=10).status_code == 404
            sizes = {d: int(requests.head(f"{server.url}/v2/app/blobs/{d}", timeout=10).headers["Content-Length"])
                     for d in [config, *layers]}
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config,
                           "size": sizes[config]},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": sizes[d]}
                           for d in layers]}).encode()
            _assert_v2_507(requests.put(f"{server.url}/v2/app/manifests/v3", data=manifest, timeout=30,
                                        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}))
            assert requests.get(f"{server.url}/v2/app/manifests/v3", timeout=10).status_code == 404
            record(AREA, "disk completely full: /healthz and a manifest push (/api/v1 and /v2)",
                   "/healthz 503 'no free space left' (was 200 with writable true); the manifest push 507, no tag")

            # restarted on the full disk: it serves reads with /healthz degraded, or (when SQLite cannot even
            # open its journal) refuses in one line whose hint is free space, not "restore a backup"; bytes kept
            server.stop()
            restart_log = tmp_path / "restart-full.log"
            with open(restart_log, "w") as log_file:
                proc = subprocess.Popen(server.args(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=log_file)
            try:
                wait_until(lambda: proc.poll() is not None or _serving(server), timeout=60, what="start or exit")
                if proc.poll() is None:
                    status_code, health = _health(server)
                    assert status_code == 503 and not health["checks"]["disk_space"]["ok"], health
                    r = requests.get(f"{server.url}/api/v1/repositories/app/tags/v1", timeout=10)
                    assert r.status_code == 200, r.text
                    observed = "serves reads, /healthz 503 disk_space"
                else:
                    stderr = restart_log.read_text()
                    line = _assert_one_line_error(proc.returncode, stderr)
                    hint = next(h for h in stderr.splitlines() if h.startswith("  hint: "))
                    assert "free space" in hint and "backup" not in hint, stderr
                    observed = f"refuses to start, exit {proc.returncode}: {line.split(': ')[-1]}, hint: free space"
            finally:
                if proc.poll() is None:
                    stop_process(proc, timeout=30)
            assert "Traceback" not in restart_log.read_text()
            assert _snapshot(location) == before
            filler2.unlink()
            server.start()
            assert _health(server)[0] == 200
            assert requests.get(f"{server.url}/api/v1/repositories/app/tags/v1", timeout=10).status_code == 200
            record(AREA, "registry restarted on a completely full disk",
                   f"{observed}; no traceback, blobs kept; healthy again once space is freed")
        finally:
            server.stop()
            if filler is not None:
                filler.unlink(missing_ok=True)


def test_start_on_a_full_disk_is_one_line_with_the_right_hint(tmp_path: Path) -> None:
    """Stopped cleanly (no SQLite journal left), then the disk filled: SQLite cannot open its journal and says
    "disk I/O error"; the hint must be free space, not "restore a backup" (which would lose data)."""
    with _tmpfs(tmp_path / "fs", "16m") as location:
        server = _server(tmp_path, location, "--min-free-space", "0", "--no-seeding")
        server.start()
        try:
            _push(server.url, "app", "v1", [os.urandom(300_000)])
        finally:
            server.stop()
        before = _snapshot(location)
        filler = _fill(location, 0)
        rc, stderr = _start_fails(server)
        line = _assert_one_line_error(rc, stderr, "cannot use the database")
        hint = next(h for h in stderr.splitlines() if h.startswith("  hint: "))
        assert "free space" in hint and "backup" not in hint, stderr
        assert _snapshot(location) == before
        filler.unlink()
        server.start()
        try:
            assert requests.get(f"{server.url}/api/v1/repositories/app/tags/v1", timeout=10).status_code == 200
        finally:
            server.stop()
    record(AREA, "registry started on a completely full disk (stopped cleanly before)",
           f"refuses to start, exit {rc}: '{line.split(': ')[-1]}', hint: free space on its volume (not 'restore "
           "a backup'); blobs kept; starts once space is freed")


def test_database_volume_full_leaves_no_blob_without_row(tmp_path: Path) -> None:
    """The SQLite file on its own small volume, filled so the commit itself fails (SQLITE_FULL): 507, and the
    blob file already moved into blobs/ is removed again (no file without a row)."""
    with _tmpfs(tmp_path / "dbfs", "2m") as dbfs:
        location = tmp_path / "registry"
        server = _server(tmp_path, location, "--db", f"sqlite:///{dbfs}/docket.db", "--min-free-space", "0",
                         "--no-seeding")
        server.start()
        try:
            filler = _fill(dbfs, 0)
            os.truncate(filler, max(0, filler.stat().st_size - 8192))  # room for the upload's check, not the commit
            full = None
            for _ in range(200):
                data = os.urandom(2000)
                r = requests.post(f"{server.url}/api/v1/blobs", params={"kind": "config"}, data=_chunked(data),
                                  timeout=30)
                if r.status_code != 201:
                    full = (r, _blob_digest(data))
                    break
            assert full is not None, "the database never filled up"
            r, digest = full
            err = _assert_v1_507(r)
            assert "database" in err["message"] or "space" in err["message"], err
            assert not (location / "blobs" / "sha256" / digest[7:]).exists()
            assert requests.get(f"{server.url}/api/v1/blobs/{digest}", timeout=10).status_code == 404
            filler.unlink()
            data = os.urandom(2000)
            r = requests.post(f"{server.url}/api/v1/blobs", params={"kind": "config"}, data=data, timeout=30)
            assert r.status_code == 201, r.text
        finally:
            server.stop()
    record(AREA, "the database's volume full (SQLite commit fails)",
           "507 'the database cannot grow'; the blob file already placed is removed again; uploads work once freed")


# -- pure logic ----------------------------------------------------------------------------------------------------
def test_storage_error_classification() -> None:
    import errno

    from sqlalchemy.exc import OperationalError

    from docket.errors import NoSpace, ServiceUnavailable
    from docket.registry.storage import storage_error

    assert isinstance(storage_error(OSError(errno.ENOSPC, "No space left on device")), NoSpace)
    assert isinstance(storage_error(OSError(errno.EDQUOT, "Disk quota exceeded")), NoSpace)
    wrapped = RuntimeError("while writing")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(storage_error(wrapped), NoSpace)
    full = OperationalError("COMMIT", {}, Exception("database or disk is full"))
    assert isinstance(storage_error(full), NoSpace)
    assert isinstance(storage_error(OSError(errno.EROFS, "Read-only file system")), ServiceUnavailable)
    assert isinstance(storage_error(OSError(errno.EIO, "Input/output error")), ServiceUnavailable)
    locked = OperationalError("INSERT", {}, Exception("database is locked"))
    assert isinstance(storage_error(locked), ServiceUnavailable)
    assert storage_error(OSError(errno.ENOENT, "No such file")) is None
    assert storage_error(ValueError("x")) is None
