"""The web page (``GET /``, ``/repositories/<name>``) and agent heartbeats (``PUT/GET /api/v1/hosts``) in process:
what the page shows, that names cannot inject markup, the token prompt, heartbeat validation and host staleness.
The real browser, real tracker and real agent are in tests/e2e/test_web_page.py."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import base64
import time
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser

import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from docket.registry.hosts import MAX_BODY, MAX_DIGESTS, host_state
from docket.registry.models import Host
from docket.registry.webview import PAGE_SIZE, ago, human_size
from tests.support.procs import free_port
from tests.support.registry_images import layer_tar

PUSH, READ = "push-token-0123456789", "read-token-0123456789"


@pytest.fixture
def dead_tracker_port() -> int:
    return free_port()  # nothing listens there: every scrape is refused at once



def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push(client: FlaskClient, ref: str, layers: list[bytes], headers: dict | None = None) -> dict:
    """What `docket push` does: each layer, the config, then the manifest."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "created": "2025-01-02T03:04:05Z",
                         "rootfs": {"type": "layers", "diff_ids": [sha(x) for x in layers]}}).encode()
    for data, kind in [(x, "layer") for x in layers] + [(config, "config")]:
        resp = client.post(f"/api/v1/blobs?kind={kind}&digest={sha(data)}", data=data,
                           headers={"Content-Type": "application/octet-stream", **(headers or {})})
        assert resp.status_code in (200, 201), resp.get_data(as_text=True)
    repo, _, tag = ref.rpartition(":")
    resp = client.put(f"/api/v1/repositories/{repo}/manifests/{tag}", headers=headers,
                      json={"config": sha(config), "layers": [sha(x) for x in layers]})
    assert resp.status_code == 201, resp.get_data(as_text=True)
    return resp.get_json()


def beat(**changes) -> dict:
    body = {"hostname": "web01", "version": "0.1.0", "interval": 5, "listen_address": "127.0.0.1:5000",
            "peer_address": "10.0.0.5", "started": "2026-12-01T06:00:00Z",
            "blobs": {"count": 2, "bytes": 12_345_678, "digests": ["sha256:" + "a" * 64]},
            "served": {"count": 3, "bytes": 4_000_000}, "downloaded": {"count": 2, "bytes": 12_345_678}}
    body.update(changes)
    return body


class Text(HTMLParser):
    """The page's visible text, and the tags it holds."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append(tag)

    def handle_data(self, data) -> None:
        self.parts.append(data)


def page_text(resp) -> tuple[str, list[str]]:
    parser = Text()
    parser.feed(resp.get_data(as_text=True))
    return re.sub(r"\s+", " ", " ".join(parser.parts)), parser.tags


@pytest.fixture
def web_app(make_app, dead_tracker_port):
    return make_app(tracker_port=dead_tracker_port)


@pytest.fixture
def web(web_app) -> FlaskClient:
    return web_app.test_client()


def test_front_page_lists_tags_layers_sharing_health_and_hosts(web: FlaskClient) -> None:
    base = layer_tar(b"base layer " * 20_000)
    app_record = push(web, "team/app:v1", [base, layer_tar(b"app")])
    push(web, "team/other:v2", [base, layer_tar(b"other")])
    assert web.put("/api/v1/hosts/web01", json=beat()).status_code == 200

    start = time.monotonic()
    resp = web.get("/")
    assert time.monotonic() - start < 5
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in html
    assert "<script" not in html
    text, _ = page_text(resp)
    assert "team/app:v1" in text and "team/other:v2" in text
    assert app_record["digest"][:19] in text  # "sha256:" + 12 hex
    assert human_size(app_record["size"]) in text and re.search(r"\d+\.\d kB", text)
    assert "Created 1 year ago" in text and "Pushed just now" in text
    # the base layer is shared: each tag's row names the other image
    base_row = re.search(rf'<tr class="layer" data-digest="{sha(base)}">(.*?)</tr>', html, re.S)
    assert base_row and "team/other:v2" in base_row.group(1)
    assert "not shared" in text
    # nothing answers on the tracker port: said so, no counts made up
    assert "Tracker unreachable" in text and "connection refused" in text
    assert 'class="seeders"' not in html
    # health as /healthz reports it, and the host that reported in
    assert "Health: ok" in text and "database" in text and "disk space" in text
    assert "web01" in text and "10.0.0.5" in text and "12.3 MB" in text and re.search(r"\bok\b", text)
    assert web.get("/static/style.css").status_code == 200


def test_repository_page_and_filter_and_pages(web: FlaskClient) -> None:
    layer = layer_tar(b"shared by all")
    for i in range(PAGE_SIZE + 3):
        push(web, f"fleet/svc{i:02d}:v1", [layer])

    def shown(path: str) -> list[str]:
        return re.findall(r'<article class="tag" [^>]*data-ref="([^"]+)"', web.get(path).get_data(as_text=True))

    assert shown("/") == [f"fleet/svc{i:02d}:v1" for i in range(PAGE_SIZE)]
    assert "page 1 of 2" in page_text(web.get("/"))[0]
    assert shown("/?page=2") == [f"fleet/svc{i:02d}:v1" for i in range(PAGE_SIZE, PAGE_SIZE + 3)]
    assert shown("/?q=svc07") == ["fleet/svc07:v1"]
    filtered, _ = page_text(web.get("/?q=svc07"))
    assert "and 17 more" in filtered  # the layer is shared with every other image; a few are named
    assert shown("/repositories/fleet/svc07") == ["fleet/svc07:v1"]
    assert web.get("/?page=x").status_code == 200  # a bad page number is page 1, not an error


def test_user_text_cannot_inject_markup(web: FlaskClient) -> None:
    evil = '<script>alert(1)</script><img src=x onerror=alert(2)>"\''
    assert web.put("/api/v1/hosts/web01", json=beat(hostname=evil, version="<b>1</b>")).status_code == 200
    for resp in (web.get("/"), web.get("/?q=" + evil), web.get("/repositories/" + evil.replace("/", ""))):
        html = resp.get_data(as_text=True)
        assert "<script" not in html and "<img" not in html and "<b>1" not in html
        assert "&lt;script&gt;" in html
        _, tags = page_text(resp)
        assert "script" not in tags and "img" not in tags
    assert web.get("/repositories/nope").status_code == 404
    # names themselves are validated at push: such a repository cannot exist
    assert web.put("/api/v1/repositories/%3Cscript%3E/manifests/v1", json={"config": "sha256:" + "0" * 64,
                                                                          "layers": []}).status_code == 400


def test_read_tokens_guard_the_page_with_a_basic_prompt(make_app, dead_tracker_port) -> None:
    web = make_app(tracker_port=dead_tracker_port, auth_tokens=(PUSH,), read_tokens=(READ,)).test_client()
    push(web, "secret/app:v1", [layer_tar(b"secret")], headers={"Authorization": f"Bearer {PUSH}"})
    for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": "Basic bm9wZTpub3Bl"}):
        for path in ("/", "/repositories/secret/app"):
            resp = web.get(path, headers=headers)
            assert resp.status_code == 401
            assert resp.headers["WWW-Authenticate"].startswith('Basic realm="docket"')
            assert "secret" not in resp.get_data(as_text=True)
    basic = "Basic " + base64.b64encode(f"anyone:{READ}".encode()).decode()
    for auth in (basic, f"Bearer {READ}", f"Bearer {PUSH}"):
        resp = web.get("/", headers={"Authorization": auth})
        assert resp.status_code == 200 and "secret/app:v1" in resp.get_data(as_text=True)
    assert web.get("/static/style.css").status_code == 200  # the stylesheet is open
    # the JSON list of hosts is a read like any other
    assert web.get("/api/v1/hosts").status_code == 401
    assert web.get("/api/v1/hosts", headers={"Authorization": f"Bearer {READ}"}).status_code == 200


def test_heartbeats_need_a_read_or_push_token_when_tokens_are_set(make_app, dead_tracker_port) -> None:
    web = make_app(tracker_port=dead_tracker_port, auth_tokens=(PUSH,), read_tokens=(READ,)).test_client()
    assert web.put("/api/v1/hosts/h1", json=beat()).status_code == 401
    assert web.put("/api/v1/hosts/h1", json=beat(), headers={"Authorization": "Bearer nope"}).status_code == 401
    for i, token in enumerate((READ, PUSH)):
        assert web.put(f"/api/v1/hosts/h{i}", json=beat(), headers={"Authorization": f"Bearer {token}"}
                       ).status_code == 200
    listed = web.get("/api/v1/hosts", headers={"Authorization": f"Bearer {READ}"}).get_json()["hosts"]
    assert [h["id"] for h in listed] == ["h0", "h1"]
    # push tokens only (reads open): anyone may heartbeat, as anyone may read
    open_reads = make_app(location=web.application.extensions["docket"].config.location.parent / "other",
                          tracker_port=dead_tracker_port, auth_tokens=(PUSH,)).test_client()
    assert open_reads.put("/api/v1/hosts/h1", json=beat()).status_code == 200


def hosts(web: FlaskClient) -> list[dict]:
    return web.get("/api/v1/hosts").get_json()["hosts"]


@pytest.mark.parametrize("host_id", ["-lead", ".hidden", "a" * 129, "sp ace", "semi;colon", "ünï", "a%2Fb", "a:b"])
def test_bad_host_ids_are_refused(web: FlaskClient, host_id: str) -> None:
    resp = web.put(f"/api/v1/hosts/{host_id}", json=beat())
    assert resp.status_code in (400, 404), resp.get_data(as_text=True)  # a "/" never routes to a host id
    if resp.status_code == 400:
        assert resp.get_json()["error"]["code"] == "INVALID_REQUEST"
    assert hosts(web) == []


@pytest.mark.parametrize("change", [
    {"interval": "5"}, {"interval": 0}, {"interval": True}, {"interval": 1e9}, {"hostname": ""},
    {"hostname": 5}, {"hostname": "x" * 256}, {"hostname": "a\nb"}, {"version": None}, {"started": "yesterday"},
    {"started": "2026-12-01T06:00:00"}, {"blobs": [1, 2]}, {"blobs": {"count": -1, "bytes": 0}},
    {"blobs": {"count": 1.5, "bytes": 0}}, {"blobs": {"count": 1, "bytes": 2**63}},
    {"blobs": {"count": 1, "bytes": 1, "digests": ["nope"]}},
    {"blobs": {"count": 1, "bytes": 1, "digests": "sha256:" + "a" * 64}},
    {"blobs": {"count": 1, "bytes": 1, "digests": ["sha256:" + "a" * 64] * (MAX_DIGESTS + 1)}},
    {"served": None}, {"downloaded": {"count": True, "bytes": 0}}, {"peer_address": ["10.0.0.1"]},
])
def test_bad_heartbeats_are_refused_and_store_nothing(web: FlaskClient, change: dict) -> None:
    resp = web.put("/api/v1/hosts/web01", json=beat(**change))
    assert resp.status_code == 400, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body["error"]) == {"code", "message", "hint"} and body["error"]["code"] == "INVALID_REQUEST"
    assert hosts(web) == []


def test_malformed_and_huge_heartbeats_are_refused(web: FlaskClient) -> None:
    for data, ctype, status in ((b"{", "application/json", 400), (b"[]", "application/json", 400),
                                (b'{"a": 1, "a": 2}', "application/json", 400),
                                (json.dumps(beat()).encode(), "text/plain", 400),
                                (b" " * (MAX_BODY + 1), "application/json", 413)):
        resp = web.put("/api/v1/hosts/web01", data=data, headers={"Content-Type": ctype})
        assert resp.status_code == status, resp.get_data(as_text=True)
        assert "error" in resp.get_json()
    assert hosts(web) == []


def test_one_host_with_its_digests(web: FlaskClient) -> None:
    digests = ["sha256:" + c * 64 for c in "abc"]
    assert web.put("/api/v1/hosts/web01", json=beat(blobs={"count": 3, "bytes": 30, "digests": digests})).status_code == 200
    assert hosts(web)[0]["blobs"] == {"count": 3, "bytes": 30}  # the list leaves the digests out
    one = web.get("/api/v1/hosts/web01")
    assert one.status_code == 200 and one.get_json()["blobs"]["digests"] == digests
    assert web.get("/api/v1/hosts/web02").status_code == 404
    assert web.get("/api/v1/hosts/-bad").get_json()["error"]["code"] == "INVALID_REQUEST"


def test_a_host_is_silent_after_three_missed_intervals(web: FlaskClient) -> None:
    assert web.put("/api/v1/hosts/quick", json=beat(interval=0.2)).status_code == 200
    assert web.put("/api/v1/hosts/slow", json=beat(interval=60)).status_code == 200
    assert {h["id"]: h["state"] for h in hosts(web)} == {"quick": "ok", "slow": "ok"}
    time.sleep(0.8)
    assert {h["id"]: h["state"] for h in hosts(web)} == {"quick": "silent", "slow": "ok"}
    text, _ = page_text(web.get("/"))
    assert re.search(r"quick .*? silent", text) and "slow" in text
    scrape = web.get("/metrics").get_data(as_text=True)
    states = {s.labels["state"]: s.value for f in text_string_to_metric_families(scrape) for s in f.samples
              if s.name == "docket_hosts"}
    assert states == {"ok": 1, "silent": 1}
    assert web.put("/api/v1/hosts/quick", json=beat(interval=0.2)).status_code == 200  # back again
    assert {h["id"]: h["state"] for h in hosts(web)}["quick"] == "ok"


def test_host_state_and_expiry(web_app, web: FlaskClient) -> None:
    now = datetime.now(UTC)
    assert host_state(now - timedelta(seconds=14.9), 5, now) == "ok"
    assert host_state(now - timedelta(seconds=15.1), 5, now) == "silent"
    assert web.put("/api/v1/hosts/old", json=beat()).status_code == 200
    with web_app.extensions["docket"].db.session() as s:
        s.get(Host, "old").last_seen = now - timedelta(days=1, minutes=1)
        s.commit()
    assert hosts(web) == []  # never listed once a day old
    assert web.put("/api/v1/hosts/new", json=beat()).status_code == 200  # a heartbeat removes old rows
    with web_app.extensions["docket"].db.session() as s:
        assert s.get(Host, "old") is None


def test_human_units() -> None:
    assert [human_size(n) for n in (0, 999, 12_345, 12_345_678, 3 * 10**12)] == \
        ["0 B", "999 B", "12.3 kB", "12.3 MB", "3.0 TB"]
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert ago(now - timedelta(minutes=3, seconds=5), now) == "3 minutes ago"
    assert ago(now - timedelta(seconds=1), now) == "1 second ago"
    assert ago(now - timedelta(days=40), now) == "1 month ago"
    assert ago(now + timedelta(hours=2), now) == "2026-12-01 14:00 UTC"


def test_a_hung_tracker_does_not_hang_the_page(make_app) -> None:
    """A tracker that accepts connections and never answers: the page comes within its budget and says so;
    the next view within a few seconds does not wait again."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        web = make_app(tracker_port=hung.getsockname()[1]).test_client()
        push(web, "team/app:v1", [layer_tar(b"one"), layer_tar(b"two")])
        start = time.monotonic()
        text, _ = page_text(web.get("/"))
        assert time.monotonic() - start < 4.5
        assert "Tracker unreachable" in text
        start = time.monotonic()
        assert "Tracker unreachable" in page_text(web.get("/"))[0]
        assert time.monotonic() - start < 1.0  # cached
