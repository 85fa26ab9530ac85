"""Tag retention (docket/registry/retention.py) and POST /api/v1/admin/retention, in-process (no seeding): the pure
rule, the plan over real rows, dry runs, removal through the tag-delete path, a push racing the policy, the
endpoint's auth and input checks, tags pushed over /v2 (an index too), and GC after it."""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from docket.errors import InvalidRequest
from docket.registry.models import Blob, Image, Manifest, utcnow
from docket.registry.retention import Candidate, RetentionPolicy, choose
from tests.support.apps import snapshot
from tests.support.registry_images import layer_tar

PUSH_TOKEN, READ_TOKEN = "push-token-0123456789", "read-token-0123456789"
T0 = datetime(2025, 1, 1, tzinfo=UTC)
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push(client: FlaskClient, ref: str, layers: list[bytes], headers: dict | None = None) -> dict:
    """A docket push: each layer and the config uploaded, then the manifest PUT."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2025-01-02T03:04:05Z",
                         "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]}}).encode()
    for data, kind in [*((x, "layer") for x in layers), (config, "config")]:
        resp = client.post(f"/api/v1/blobs?kind={kind}&digest={sha(data)}", data=data,
                           headers={"Content-Type": "application/octet-stream", **(headers or {})})
        assert resp.status_code in (200, 201), resp.get_data(as_text=True)
    repo, _, tag = ref.rpartition(":")
    resp = client.put(f"/api/v1/repositories/{repo}/manifests/{tag}",
                      json={"config": sha(config), "layers": [sha(x) for x in layers]}, headers=headers)
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


def set_pushed(app: Flask, ref: str, when: datetime) -> None:
    repo, _, tag = ref.rpartition(":")
    with app.extensions["docket"].db.session() as s:
        s.scalars(select(Image).where(Image.repository == repo, Image.tag == tag)).one().pushed_at = when
        s.commit()


def tags(client: FlaskClient, headers: dict | None = None) -> list[str]:
    return [i["ref"] for i in client.get("/api/v1/images", headers=headers).get_json()["images"]]


def retention(client: FlaskClient, query: str = "", **kw: Any):
    return client.post(f"/api/v1/admin/retention{query}", **kw)


def scraped(client: FlaskClient, name: str) -> float:
    """One sample of /metrics, parsed with prometheus_client's own parser."""
    text = client.get("/metrics").get_data(as_text=True)
    values = [s.value for family in text_string_to_metric_families(text) for s in family.samples if s.name == name]
    assert len(values) == 1, (name, values)
    return values[0]


def removed(resp) -> list[str]:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return [f"{r['repository']}:{r['tag']}" for r in resp.get_json()["removed"]]


def candidates(*specs: tuple[str, int]) -> list[Candidate]:
    return [Candidate("r", tag, None, T0 + timedelta(seconds=sec)) for tag, sec in specs]


# -- the rule, pure ---------------------------------------------------------------------------------------------
def test_rule_newest_n_patterns_do_not_count_and_ties_by_name():
    tags_ = candidates(("a", 1), ("b", 5), ("v1.0", 0), ("c", 3), ("v1.1", 9), ("d", 3))
    going, kept = choose(RetentionPolicy(2, ("v1*",)), tags_)
    # unprotected newest first: b(5), then d and c at 3 (equal: "d" sorts last, so it counts as newer), a(1)
    assert [c.tag for c in going] == ["c", "a"] and kept == 4
    going, kept = choose(RetentionPolicy(1), tags_)
    assert [c.tag for c in going] == ["b", "d", "c", "a", "v1.0"] and kept == 1  # v1.1 is the newest
    assert choose(RetentionPolicy(10, ("*",)), tags_) == ([], 6)
    assert [c.tag for c in choose(RetentionPolicy(1, ("[ab]", "v1.?")), tags_)[0]] == ["c"]  # d newest of c, d
    assert not RetentionPolicy(1, ("V1*",)).protects("v1.0")  # case-sensitive, whole tag
    assert not RetentionPolicy(1, ("v1",)).protects("v1.0")


@pytest.mark.parametrize("keep, patterns", [(0, ()), (-1, ()), (True, ()), ("3", ()), (1, ("",)), (1, ("v1/*",)),
                                            (1, ("a b",)), (1, ("x" * 129,)), (1, (3,))])
def test_policy_refuses_bad_values(keep, patterns):
    with pytest.raises(InvalidRequest):
        RetentionPolicy(keep, patterns)


# -- the component over real rows ---------------------------------------------------------------------------------
@pytest.fixture
def four(app: Flask, client: FlaskClient) -> dict[str, dict]:
    """app:v1.0 (oldest) .. app:d (newest), all sharing a base layer, and other:x alone in its repository."""
    base = layer_tar(b"shared base")
    recs = {}
    for i, tag in enumerate(["v1.0", "b", "c", "d"]):
        recs[tag] = push(client, f"app:{tag}", [base, layer_tar(tag.encode())])
        set_pushed(app, f"app:{tag}", T0 + timedelta(minutes=i))
    recs["x"] = push(client, "other:x", [layer_tar(b"other")])
    return recs


@pytest.mark.registry_config(keep_tags=1, keep_patterns=("v1*",))
def test_dry_run_lists_and_changes_nothing_then_apply_and_gc(app, client, location, four):
    before = snapshot(client, location)
    resp = retention(client)  # a dry run by default
    assert removed(resp) == ["app:c", "app:b"]
    body = resp.get_json()
    assert body["dry_run"] is True and body["kept"] == 3
    assert body["policy"] == {"keep_tags": 1, "keep_patterns": ["v1*"]}
    assert body["removed"][0]["digest"] == four["c"]["digest"]
    assert body["removed"][0]["pushed_at"].startswith("2025-01-01T00:02:00")
    assert snapshot(client, location) == before
    sv = app.extensions["docket"]
    assert sv.retention.stats.runs == 0 and sv.retention.stats.tags_removed == 0

    resp = retention(client, "?dry_run=false")
    assert removed(resp) == ["app:c", "app:b"] and resp.get_json()["dry_run"] is False
    assert tags(client) == ["app:d", "app:v1.0", "other:x"]
    assert client.get("/api/v1/repositories/app/tags/b").status_code == 404
    assert sv.retention.stats.runs == 1 and sv.retention.stats.tags_removed == 2
    assert sv.retention.stats.last_run is not None
    assert removed(retention(client, json={"dry_run": False})) == []  # nothing more to do
    assert sv.retention.stats.runs == 2 and sv.retention.stats.tags_removed == 2
    assert scraped(client, "docket_retention_runs_total") == 2  # the real component, read by /metrics
    assert scraped(client, "docket_retention_tags_removed_total") == 2

    # GC: the removed tags' own layers, configs and manifests go after the grace; the shared base stays
    gone = {four[t][k] for t in ("b", "c") for k in ("digest", "image_id")} | \
        {four[t]["layers"][1]["digest"] for t in ("b", "c")}
    assert sv.gc.run_once() == []
    assert set(sv.gc.run_once(now=utcnow() + timedelta(hours=1))) == gone
    assert scraped(client, "docket_gc_blobs_removed_total") == len(gone)
    stored = {f"sha256:{p.name}" for p in (location / "blobs" / "sha256").iterdir()}
    assert not gone & stored and four["d"]["layers"][0]["digest"] in stored
    assert client.get(f"/api/v1/blobs/{four['d']['layers'][1]['digest']}").status_code == 200


def test_one_off_policy_and_a_push_racing_the_plan(app, client, four):
    sv = app.extensions["docket"]
    assert not sv.retention.enabled  # no --keep-tags: no timer
    # query overrides: keep 2, no pattern given -> the registry's (none)
    assert removed(retention(client, "?keep_tags=2")) == ["app:b", "app:v1.0"]
    assert removed(retention(client, json={"keep_tags": 1, "keep_patterns": ["b", "c"]})) == ["app:v1.0"]
    plan = sv.retention.plan(RetentionPolicy(2))
    assert [c.tag for c in plan.remove] == ["b", "v1.0"]
    push(client, "app:b", [layer_tar(b"b again")])  # pushed again after the plan: now the newest
    client.delete("/api/v1/repositories/app/tags/v1.0")  # deleted meanwhile
    assert sv.retention.execute(plan).remove == ()
    assert tags(client) == ["app:b", "app:c", "app:d", "other:x"]
    assert sv.retention.stats.runs == 1 and sv.retention.stats.tags_removed == 0


def test_admin_retention_auth_and_bad_input_remove_nothing(make_app, location):
    app = make_app(auth_tokens=(PUSH_TOKEN,), read_tokens=(READ_TOKEN,), keep_tags=1)
    client = app.test_client()
    auth = {"Authorization": f"Bearer {PUSH_TOKEN}"}
    for tag in ("a", "b"):
        push(client, f"app:{tag}", [layer_tar(tag.encode())], headers=auth)
    assert retention(client, "?dry_run=false").status_code == 401
    resp = retention(client, "?dry_run=false", headers={"Authorization": f"Bearer {READ_TOKEN}"})
    assert resp.status_code == 403 and resp.get_json()["error"]["code"] == "FORBIDDEN"
    bad = [("?keep_tags=0", None), ("?keep_tags=-1", None), ("?keep_tags=two", None), ("?keep_pattern=a/b", None),
           ("?dry_run=maybe", None), ("?dry_run=false&keep_tags=1&nope=1", None), ("", {"keep_tags": 0}),
           ("", {"keep_tags": "1"}), ("", {"keep_tags": 1.5}), ("", {"dry_run": "false"}),
           ("", {"keep_patterns": "v1*"}), ("", {"keep_patterns": [1]}), ("", {"keep_patterns": ["v1 *"]}),
           ("", {"dry_run": False, "extra": 1}), ("", [1]), ("?keep_tags=1", {"keep_tags": 1})]
    for query, body in bad:
        resp = retention(client, query, headers=auth, json=body) if body is not None else \
            retention(client, query, headers=auth)
        assert resp.status_code == 400, (query, body, resp.get_data(as_text=True))
        err = resp.get_json()["error"]
        assert err["code"] == "INVALID_REQUEST" and err["message"] and err["hint"], (query, body)
    resp = retention(client, "?dry_run=false", headers={**auth, "Content-Type": "application/json"}, data=b"{x")
    assert resp.status_code == 400
    assert tags(client, auth) == ["app:a", "app:b"]
    assert app.extensions["docket"].retention.stats.runs == 0
    assert removed(retention(client, "?dry_run=false", headers=auth)) == ["app:a"]


def test_no_policy_is_400(client):
    resp = retention(client)
    assert resp.status_code == 400 and "--keep-tags" in resp.get_json()["error"]["message"]
    resp = retention(client, "?keep_pattern=v1*")  # patterns alone are no policy
    assert resp.status_code == 400


# -- tags pushed over /v2: an image and an index --------------------------------------------------------------------
def _store(app: Flask, data: bytes) -> dict:
    sv = app.extensions["docket"]
    with sv.store.upload() as up:
        up.write(data)
        up.finish()
        sv.blobs.store_upload(up, "blob")
    return {"digest": sha(data), "size": len(data)}


def _v2_image(app: Flask, client: FlaskClient, name: str, ref: str, payload: bytes) -> bytes:
    layer = layer_tar(payload)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
    _store(app, layer)
    _store(app, config)
    raw = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                      "config": {"mediaType": DOCKER_CONFIG, **_store(app, config)},
                      "layers": [{"mediaType": LAYER, **_store(app, layer)}]}).encode()
    resp = client.put(f"/v2/{name}/manifests/{ref}", data=raw, headers={"Content-Type": DOCKER_MANIFEST})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return raw


def test_v2_tags_and_an_index_go_with_their_manifests(app, client):
    old = _v2_image(app, client, "v2app", "old", b"old image")
    child = _v2_image_by_digest(app, client, "v2app", b"child of the index")
    idx = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
        {"mediaType": DOCKER_MANIFEST, "digest": sha(child), "size": len(child),
         "platform": {"architecture": "amd64", "os": "linux"}}]}).encode()
    resp = client.put("/v2/v2app/manifests/multi", data=idx, headers={"Content-Type": OCI_INDEX})
    assert resp.status_code == 201
    _v2_image(app, client, "v2app", "new", b"new image")
    set_pushed(app, "v2app:old", T0)
    set_pushed(app, "v2app:multi", T0 + timedelta(seconds=1))
    assert removed(retention(client, json={"keep_tags": 1, "dry_run": False})) == ["v2app:multi", "v2app:old"]
    assert tags(client) == ["v2app:new"]
    sv = app.extensions["docket"]
    with sv.db.session() as s:  # the untagged manifests went: the index, the child only it kept, the old image
        left = set(s.scalars(select(Manifest.digest).where(Manifest.repository == "v2app")))
    assert sha(idx) not in left and sha(child) not in left and sha(old) not in left and len(left) == 1
    assert client.get(f"/v2/v2app/manifests/{sha(child)}").status_code == 404
    freed = sv.gc.run_once(now=utcnow() + timedelta(hours=1))
    assert {sha(idx), sha(child), sha(old), sha(layer_tar(b"child of the index"))} <= set(freed)
    assert client.get("/v2/v2app/manifests/new").status_code == 200


def _v2_image_by_digest(app: Flask, client: FlaskClient, name: str, payload: bytes) -> bytes:
    layer = layer_tar(payload)
    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "rootfs": {"type": "layers", "diff_ids": [sha(layer)]}}).encode()
    raw = json.dumps({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
                      "config": {"mediaType": DOCKER_CONFIG, **_store(app, config)},
                      "layers": [{"mediaType": LAYER, **_store(app, layer)}]}).encode()
    resp = client.put(f"/v2/{name}/manifests/{sha(raw)}", data=raw, headers={"Content-Type": DOCKER_MANIFEST})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return raw


@pytest.mark.registry_config(keep_tags=1, retention_interval=0.2)
def test_timer_runs_after_one_interval(app, client):
    for tag in ("a", "b"):
        push(client, f"app:{tag}", [layer_tar(tag.encode())])
    sv = app.extensions["docket"]
    assert sv.retention.enabled
    sv.retention.start()
    try:
        assert sv.retention.stats.runs == 0  # not at start
        deadline = time.monotonic() + 10
        while sv.retention.stats.runs == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        sv.retention.stop()
    assert sv.retention.stats.tags_removed == 1 and tags(client) == ["app:b"]
    with sv.db.session() as s:
        assert s.get(Blob, sha(layer_tar(b"a"))).unreferenced_at is not None


def test_delete_with_prune_frees_a_v2_tag_and_bad_prune_is_400(app, client):
    raw = _v2_image(app, client, "pruned", "v1", b"pruned image")
    kept = _v2_image(app, client, "plain", "v1", b"plain delete")
    resp = client.delete("/api/v1/repositories/pruned/tags/v1?prune=maybe")
    assert resp.status_code == 400 and client.get("/v2/pruned/manifests/v1").status_code == 200
    assert client.delete("/api/v1/repositories/pruned/tags/v1?prune=true").status_code == 204
    assert client.delete("/api/v1/repositories/plain/tags/v1").status_code == 204  # as before: the manifest stays
    assert client.get(f"/v2/pruned/manifests/{sha(raw)}").status_code == 404
    assert client.get(f"/v2/plain/manifests/{sha(kept)}").status_code == 200
    freed = app.extensions["docket"].gc.run_once(now=utcnow() + timedelta(hours=1))
    assert {sha(raw), sha(layer_tar(b"pruned image"))} <= set(freed) and sha(kept) not in freed
