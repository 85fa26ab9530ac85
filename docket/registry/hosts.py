"""Agent heartbeats: ``PUT /api/v1/hosts/<host-id>`` (a ``docket agent`` reporting what it holds and serves) and
``GET /api/v1/hosts`` (the fleet, for ``docket hosts`` and the web page).

Heartbeats are rows in the database (table ``hosts``), so registry instances sharing one database list the same
fleet. A host is "silent" once it missed three of its own intervals; rows not renewed for a day are deleted on
the next heartbeat (any host's), and never listed meanwhile. Every field is checked before anything is written: a
bad body is a 400 in the /api/v1 error shape and stores nothing.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from sqlalchemy import delete, func, select
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session

from docket import jsonstrict
from docket.errors import DocketError, InvalidJSON, InvalidRequest, NotFound, TooLarge
from docket.registry.bodies import read_small
from docket.registry.db import Database, get_session
from docket.registry.models import Host, utcnow
from docket.registry.store import validate_digest

HOST_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
MAX_BODY = 256 * 1024  # bytes: MAX_DIGESTS digests of sha512 fit with room to spare
MAX_DIGESTS = 1000  # digests a heartbeat may list (the counts cover the rest)
MAX_HOSTS = 10_000  # rows: a new host id past this is refused (503) until old rows expire
MISSED = 3  # intervals without a heartbeat before a host shows as silent
EXPIRE = timedelta(days=1)
MAX_INT = 2**63 - 1
TEXT_FIELDS = {"hostname": 255, "peer_address": 64, "listen_address": 300, "version": 64}
COUNTS = ("count", "bytes")
HINT = ('the body is {"hostname", "listen_address", "peer_address", "version", "interval", "started", '
        '"blobs": {"count", "bytes", "digests": [...]}, "served": {"count", "bytes"}, '
        '"downloaded": {"count", "bytes"}} (docket agent sends it)')


class TooManyHosts(DocketError):
    status, code, exit_code = 503, "TOO_MANY_HOSTS", 8


@dataclass(frozen=True)
class Heartbeat:
    """One checked heartbeat body."""

    hostname: str
    listen_address: str | None
    peer_address: str | None
    version: str
    interval: float
    started: datetime | None
    blobs: int
    blob_bytes: int
    digests: list[str]
    served_blobs: int
    served_bytes: int
    downloaded_blobs: int
    downloaded_bytes: int


def validate_host_id(host_id: str) -> str:
    if not HOST_ID.match(host_id):
        raise InvalidRequest(f"invalid host id {host_id[:140]!r}",
                             "1 to 128 characters of letters, digits, '.', '_' and '-', starting with a letter or "
                             "digit (docket agent --host-id)")
    return host_id


def _text(body: dict[str, Any], key: str, *, required: bool) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value or len(value) > TEXT_FIELDS[key] or \
            any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidRequest(f"{key} must be a non-empty string of at most {TEXT_FIELDS[key]} printable "
                             "characters", HINT)
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_INT:
        raise InvalidRequest(f"{what} must be a whole number from 0 to {MAX_INT}", HINT)
    return value


def _counts(body: dict[str, Any], key: str) -> tuple[int, int]:
    value = body.get(key)
    if not isinstance(value, dict):
        raise InvalidRequest(f"{key} must be an object with count and bytes", HINT)
    return _count(value.get("count"), f"{key}.count"), _count(value.get("bytes"), f"{key}.bytes")


def parse_heartbeat(raw: bytes) -> Heartbeat:
    """The checked body, or InvalidRequest/InvalidJSON/TooLarge naming the first bad field."""
    if len(raw) > MAX_BODY:
        raise TooLarge(f"a heartbeat is at most {MAX_BODY} bytes")
    try:
        body = jsonstrict.loads(raw, what="heartbeat", max_bytes=MAX_BODY)
    except InvalidJSON as exc:
        raise InvalidJSON(exc.message, HINT) from exc
    if not isinstance(body, dict):
        raise InvalidRequest("a heartbeat is a JSON object", HINT)
    interval = body.get("interval")
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not 0.1 <= interval <= 3600:
        raise InvalidRequest("interval must be a number of seconds from 0.1 to 3600", HINT)
    started = body.get("started")
    when = None
    if started is not None:
        if not isinstance(started, str) or len(started) > 40:
            raise InvalidRequest("started must be an RFC 3339 time", HINT)
        try:
            when = datetime.fromisoformat(started.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRequest("started must be an RFC 3339 time", HINT) from None
        if when.tzinfo is None:
            raise InvalidRequest("started must carry its zone (e.g. ...Z)", HINT)
    blobs = body.get("blobs")
    count, nbytes = _counts(body, "blobs")
    digests = blobs.get("digests", [])
    if not isinstance(digests, list) or len(digests) > MAX_DIGESTS or not all(isinstance(d, str) for d in digests):
        raise InvalidRequest(f"blobs.digests must be a list of at most {MAX_DIGESTS} digests", HINT)
    for digest in digests:
        validate_digest(digest)
    served = _counts(body, "served")
    downloaded = _counts(body, "downloaded")
    return Heartbeat(hostname=str(_text(body, "hostname", required=True)),
                     listen_address=_text(body, "listen_address", required=False),
                     peer_address=_text(body, "peer_address", required=False),
                     version=str(_text(body, "version", required=True)), interval=float(interval), started=when,
                     blobs=count, blob_bytes=nbytes, digests=list(dict.fromkeys(digests)),
                     served_blobs=served[0], served_bytes=served[1], downloaded_blobs=downloaded[0],
                     downloaded_bytes=downloaded[1])


def host_state(last_seen: datetime, interval: float, now: datetime) -> str:
    """"ok" while the host's heartbeats arrive, "silent" once it missed MISSED of its intervals."""
    return "silent" if (now - last_seen).total_seconds() > MISSED * interval else "ok"


def _rfc3339(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value is not None else None


def host_record(row: Host, now: datetime, *, digests: bool = True) -> dict[str, Any]:
    """A host as /api/v1/hosts shows it; the list leaves out the digests (up to 1,000 a host), one host has them."""
    held: dict[str, Any] = {"count": row.blobs, "bytes": row.blob_bytes}
    if digests:
        held["digests"] = json.loads(row.digests)
    return {"id": row.id, "hostname": row.hostname, "peer_address": row.peer_address,
            "listen_address": row.listen_address, "remote_address": row.remote_address, "version": row.version,
            "interval": row.interval, "state": host_state(row.last_seen, row.interval, now),
            "last_seen": _rfc3339(row.last_seen), "seconds_since": round((now - row.last_seen).total_seconds(), 1),
            "first_seen": _rfc3339(row.first_seen), "started": _rfc3339(row.started),
            "blobs": held,
            "served": {"count": row.served_blobs, "bytes": row.served_bytes},
            "downloaded": {"count": row.downloaded_blobs, "bytes": row.downloaded_bytes}}


class Hosts:
    """The heartbeat table: record a heartbeat, list the fleet."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def record(self, host_id: str, beat: Heartbeat, remote: str | None) -> dict[str, Any]:
        try:
            return self._record(host_id, beat, remote)
        except sa_exc.IntegrityError:  # the same new id inserted by another request (or registry) meanwhile
            return self._record(host_id, beat, remote)

    def _record(self, host_id: str, beat: Heartbeat, remote: str | None) -> dict[str, Any]:
        now = utcnow()
        with self.db.session() as s:
            s.execute(delete(Host).where(Host.last_seen < now - EXPIRE))  # the expiry: on every heartbeat
            row = s.get(Host, host_id)
            if row is None:
                if (s.scalar(select(func.count()).select_from(Host)) or 0) >= MAX_HOSTS:
                    raise TooManyHosts(f"this registry already lists {MAX_HOSTS} hosts",
                                       "hosts silent for a day are removed; retry later")
                row = Host(id=host_id, first_seen=now)
                s.add(row)
            row.hostname, row.listen_address, row.peer_address = beat.hostname, beat.listen_address, beat.peer_address
            row.version, row.interval, row.started = beat.version, beat.interval, beat.started
            row.blobs, row.blob_bytes, row.digests = beat.blobs, beat.blob_bytes, json.dumps(beat.digests)
            row.served_blobs, row.served_bytes = beat.served_blobs, beat.served_bytes
            row.downloaded_blobs, row.downloaded_bytes = beat.downloaded_blobs, beat.downloaded_bytes
            row.remote_address = (remote or "")[:64] or None
            row.last_seen = now
            s.commit()
            return host_record(row, now)

    def list(self, session: Session) -> list[dict[str, Any]]:
        """Every host heard from within a day, by id (without their digests)."""
        now = utcnow()
        rows = session.scalars(select(Host).where(Host.last_seen >= now - EXPIRE).order_by(Host.id))
        return [host_record(r, now, digests=False) for r in rows]

    def states(self) -> dict[str, int]:
        """How many hosts heard from within a day are "ok" and "silent" (for /metrics: one narrow query)."""
        now = utcnow()
        counts = {"ok": 0, "silent": 0}
        with self.db.session() as s:
            for last_seen, interval in s.execute(select(Host.last_seen, Host.interval)
                                                 .where(Host.last_seen >= now - EXPIRE)):
                counts[host_state(last_seen, interval, now)] += 1
        return counts

    def get(self, session: Session, host_id: str) -> dict[str, Any]:
        now = utcnow()
        row = session.get(Host, host_id)
        if row is None or row.last_seen < now - EXPIRE:
            raise NotFound(f"no host {host_id} has reported to this registry within a day",
                           "list the hosts with GET /api/v1/hosts (docket hosts)")
        return host_record(row, now)


bp = Blueprint("hosts", __name__, url_prefix="/api/v1")


def init_app(app: Flask) -> None:
    """The blueprint; heartbeats check their token in the view (a read token may send one: a PUT otherwise needs
    a push token)."""
    app.register_blueprint(bp)
    auth = app.extensions.get("docket_auth")
    if auth is not None:
        auth.delegate("hosts.heartbeat")


def _hosts() -> Hosts:
    return current_app.extensions["docket"].hosts


def may_heartbeat() -> Response | tuple[Response, int, dict[str, str]] | None:
    """Any read or push token may heartbeat (an agent holds a read token); where reads are open, anyone."""
    auth = current_app.extensions.get("docket_auth")
    return auth.decide(write=False) if auth is not None and auth.enabled else None


@bp.put("/hosts/<host_id>")
def heartbeat(host_id: str) -> Response | tuple[Response, int, dict[str, str]]:
    denied = may_heartbeat()
    if denied is not None:
        return denied
    validate_host_id(host_id)
    if request.mimetype and request.mimetype != "application/json":
        raise InvalidRequest(f"unsupported Content-Type {request.mimetype!r}", "send the heartbeat as application/json")
    beat = parse_heartbeat(read_small(MAX_BODY, "heartbeat"))
    return jsonify(_hosts().record(host_id, beat, request.remote_addr))


@bp.get("/hosts")
def list_hosts() -> Response:
    return jsonify({"hosts": _hosts().list(get_session())})


@bp.get("/hosts/<host_id>")
def get_host(host_id: str) -> Response:
    """One host's last heartbeat, with the digests it holds."""
    return jsonify(_hosts().get(get_session(), validate_host_id(host_id)))
