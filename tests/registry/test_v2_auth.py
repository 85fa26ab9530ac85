"""Tokens under /v2: Bearer or Basic (token as password), the challenged version check docker login needs."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

PUSH, READ = "push-token-0123456789", "read-token-0123456789"


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


pytestmark = [pytest.mark.registry_config(auth_tokens=(PUSH,)), pytest.mark.databases("sqlite", "postgresql")]


def test_version_check_challenges_without_credentials(client):
    resp = client.get("/v2/")
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="http://localhost/v2/token",service="docket-registry"'
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert resp.get_json()["errors"][0]["code"] == "UNAUTHORIZED"


@pytest.mark.parametrize("headers", [basic("anyone", PUSH), {"Authorization": f"Bearer {PUSH}"}])
def test_version_check_accepts_the_token_both_ways(client, headers):
    assert client.get("/v2/", headers=headers).status_code == 200


@pytest.mark.parametrize("headers", [
    basic("anyone", "wrong"), basic("anyone", ""), {"Authorization": "Basic !!!notbase64"},
    {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, {"Authorization": "Digest abc"},
    {"Authorization": "Bearer"},
])
def test_bad_credentials_are_refused(client, headers):
    resp = client.get("/v2/", headers=headers)
    assert resp.status_code == 401
    assert resp.get_json()["errors"][0]["code"] == "UNAUTHORIZED"


def test_reads_stay_open_writes_need_the_token(client):
    assert client.get("/v2/_catalog").status_code == 200
    resp = client.post("/v2/team/app/blobs/uploads/")
    assert resp.status_code == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer realm=")
    assert client.post("/v2/team/app/blobs/uploads/", headers=basic("ci", PUSH)).status_code == 202


def test_read_token_cannot_push(tmp_path: Path, make_app):
    app = make_app(auth_tokens=(PUSH,), read_tokens=(READ,))
    client = app.test_client()
    assert client.get("/v2/_catalog").status_code == 401
    assert client.get("/v2/_catalog", headers=basic("ci", READ)).status_code == 200
    resp = client.post("/v2/team/app/blobs/uploads/", headers=basic("ci", READ))
    assert resp.status_code == 403 and resp.get_json()["errors"][0]["code"] == "DENIED"


def test_basic_works_on_api_v1_too(client):
    resp = client.delete("/api/v1/repositories/team/app/tags/v1", headers=basic("ci", PUSH))
    assert resp.status_code == 404  # authorised; the tag just does not exist


def test_token_endpoint_hands_back_the_token_for_good_credentials(client):
    assert client.get("/v2/token?service=docket-registry&scope=repository:a:push",
                      headers=basic("ci", PUSH)).get_json()["token"] == PUSH
    assert client.get("/v2/token", headers=basic("ci", "wrong")).status_code == 401
    anonymous = client.get("/v2/token").get_json()["token"]  # reads are open: a read-only placeholder
    assert anonymous != PUSH
    headers = {"Authorization": f"Bearer {anonymous}"}
    assert client.get("/v2/_catalog", headers=headers).status_code == 200
    assert client.post("/v2/team/app/blobs/uploads/", headers=headers).status_code == 401


def test_token_endpoint_refuses_anonymous_when_reads_are_private(tmp_path: Path, make_app):
    app = make_app(auth_tokens=(PUSH,), read_tokens=(READ,))
    client = app.test_client()
    assert client.get("/v2/token").status_code == 401
    assert client.get("/v2/token", headers=basic("ci", READ)).get_json()["token"] == READ
