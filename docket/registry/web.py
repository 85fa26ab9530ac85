"""The web page: ``GET /`` (repositories, tags, layers and their swarms, health, hosts) and
``GET /repositories/<name>`` (every tag of one repository). Server-rendered Jinja templates (autoescaped: names
are user input) and one stylesheet (``/static/style.css``); no JavaScript.

With read tokens the page needs one: ``Authorization: Bearer <token>``, or HTTP Basic with the token as password
(any user name); otherwise a 401 with ``WWW-Authenticate: Basic realm="docket"`` (a browser asks for it) and
nothing about the registry. The stylesheet is open.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, current_app, render_template, request

from docket.registry import health, webview
from docket.registry.db import get_session
from docket.registry.swarmview import SwarmCounts

bp = Blueprint("web", __name__)
BASIC_CHALLENGE = 'Basic realm="docket", charset="UTF-8"'
MAX_QUERY = 255
MAX_HOSTS_SHOWN = 200  # the page's host table; `docket hosts` lists them all


def init_app(app: Flask) -> None:
    """The blueprint, its swarm-count cache (one per app) and its own token check (a Basic prompt)."""
    sv = app.extensions["docket"]
    app.extensions["docket_swarm_counts"] = SwarmCounts(lambda: sv.swarm.announce_url)
    app.register_blueprint(bp)
    auth = app.extensions.get("docket_auth")
    if auth is not None:
        auth.delegate("web.front", "web.repository", "static")
    app.jinja_env.filters.update(size=webview.human_size, short=webview.short_digest)


@bp.before_request
def _need_token() -> Response | None:
    auth = current_app.extensions.get("docket_auth")
    if auth is None or auth.may_read():
        return None
    text = ("The token given is not one of this registry's tokens." if request.headers.get("Authorization")
            else "This registry needs a token: give any user name and a read or push token as the password.")
    page = render_template("message.html", title="Token needed", text=text, now=None)
    return Response(page, 401, {"WWW-Authenticate": BASIC_CHALLENGE, "Cache-Control": "no-store"},
                    mimetype="text/html")


def _swarms(tags: list[webview.TagView]) -> Any:
    hashes = [layer.info_hash for tag in tags for layer in tag.layers if layer.info_hash]
    return current_app.extensions["docket_swarm_counts"].report(hashes)


def _common() -> dict[str, Any]:
    sv = current_app.extensions["docket"]
    ok, checks = health.report(sv)
    now = datetime.now(UTC)
    hosts = sv.hosts.list(get_session())
    return {"health_ok": ok, "checks": checks, "hosts": hosts[:MAX_HOSTS_SHOWN], "host_count": len(hosts), "now": now,
            "ago": lambda when: webview.ago(when, now), "ago_text": lambda text: webview.ago(_parse(text), now),
            "announce_url": sv.swarm.announce_url}


def _parse(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _page(template: str, **context: Any) -> Response:
    resp = Response(render_template(template, **context), mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Content-Security-Policy"] = "default-src 'none'; style-src 'self'; img-src 'self'"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


@bp.get("/")
def front() -> Response:
    query = request.args.get("q", "")[:MAX_QUERY]
    try:
        page = int(request.args.get("page", "1"))
    except ValueError:
        page = 1
    listing = webview.listing(get_session(), query, page)
    tags = [t for r in listing.repos for t in r.tags]
    return _page("index.html", listing=listing, query=query, swarm=_swarms(tags), **_common())


@bp.get("/repositories/<path:name>")
def repository(name: str) -> Response:
    repo = webview.repository(get_session(), name)
    if repo is None:
        resp = _page("message.html", title="Not found", text=f"No repository {name} in this registry.",
                     now=datetime.now(UTC))
        resp.status_code = 404
        return resp
    return _page("repository.html", repo=repo, swarm=_swarms(repo.tags), **_common())
