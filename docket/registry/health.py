"""``/healthz`` (cheap checks an orchestrator can poll) and ``/openapi.json``."""

from __future__ import annotations

import logging
from importlib import resources
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request
from sqlalchemy import select

from docket.errors import InvalidRequest
from docket.registry.models import SEEDED_KINDS, Blob, utcnow
from docket.registry.storage import free_bytes, human

log = logging.getLogger(__name__)

bp = Blueprint("meta", __name__)
MAX_LISTED = 20


def _database(sv: Any) -> dict[str, Any]:
    try:
        sv.db.ping()
        return {"ok": True}
    except Exception as exc:  # noqa: BLE001 - a health check reports, it does not raise
        return {"ok": False, "error": f"database query failed: {exc}"}


def _blobs(sv: Any) -> list[tuple[str, int, bool]] | None:
    """(digest, size, seeded) of every blob row; seeded = its kind gets a seeder (layer, tarball; not config)."""
    try:
        with sv.db.session() as s:
            return [(d, n, k in SEEDED_KINDS) for d, n, k in s.execute(select(Blob.digest, Blob.size, Blob.kind))]
    except Exception:  # noqa: BLE001
        return None


def _blob_store(sv: Any, blobs: list[tuple[str, int, bool]] | None) -> dict[str, Any]:
    """Writable, and every recorded blob present with its recorded size (stat only: no rehashing)."""
    result: dict[str, Any] = {"writable": sv.store.writable()}
    if blobs is None:
        result.update(ok=False, error="cannot list blobs: database unavailable")
        return result
    missing, wrong = [], []
    for digest, size, _ in blobs:
        try:
            found = sv.store.stat(digest)
        except OSError:
            found = None
        if found is None:
            missing.append(digest)
        elif found != size:
            wrong.append(digest)
    damaged = sv.scrubber.damaged()  # found by the last scrub pass (re-hashing), e.g. same-size corruption
    corrupt = sorted(d for d in damaged if d not in missing and d not in wrong)
    result.update(blobs=len(blobs), missing=missing[:MAX_LISTED], wrong_size=wrong[:MAX_LISTED],
                  corrupt=corrupt[:MAX_LISTED], scrub=_scrub_summary(sv))
    result["ok"] = result["writable"] and not missing and not wrong and not corrupt
    if not result["writable"]:
        result["error"] = f"{sv.store.location} is not writable"
    elif missing or wrong or corrupt:
        result["error"] = f"{len(missing)} blob(s) missing, {len(wrong)} with a wrong size, {len(corrupt)} corrupt"
        if corrupt:
            result["error"] += " (" + ", ".join(f"{d}: {damaged[d].reason}" for d in corrupt[:3]) + ")"
    return result


def _disk_space(sv: Any) -> dict[str, Any]:
    """Free space on the volumes the registry writes; degraded below ``--min-free-space`` (uploads are refused
    there too, with 507), so an orchestrator sees a filling disk before pushes fail."""
    minimum = sv.config.min_free_space
    try:
        free = free_bytes(sv.blobs.space_paths)
    except OSError as exc:
        return {"ok": False, "error": f"cannot read free space: {exc.strerror or exc}"}
    result: dict[str, Any] = {"ok": free >= minimum and free > 0, "free_bytes": free, "min_free_bytes": minimum}
    if not result["ok"]:
        result["error"] = (f"{human(free)} free, below the {human(minimum)} of --min-free-space: uploads are refused"
                           if free else "no free space left: uploads are refused")
    return result


def _scrub_summary(sv: Any) -> dict[str, Any]:
    last = sv.scrubber.last_pass
    return {"interval": sv.scrubber.interval, "passes": sv.scrubber.passes,
            "last_checked": last["checked"] if last else None, "last_seconds": last["seconds"] if last else None}


def _seeders(sv: Any, blobs: list[tuple[str, int, bool]] | None) -> dict[str, Any]:
    if not sv.swarm.seeding:
        return {"ok": True, "enabled": False}
    snap = sv.swarm.snapshot()
    damaged = sv.scrubber.damaged()  # not seeded on purpose; reported under blob_store
    expected = sorted(d for d in sv.seed_sync.expected(d for d, _, seeded in (blobs or []) if seeded)
                      if sv.store.stat(d) is not None and d not in damaged)
    not_running = [d for d in expected if not snap.get(d, {}).get("alive")]
    result: dict[str, Any] = {
        "ok": blobs is not None and not not_running and sv.started,
        "enabled": True,
        "expected": len(expected),
        "alive": sum(1 for d in expected if snap.get(d, {}).get("alive")),
        "not_running": not_running[:MAX_LISTED],
        "seeders": {d: snap[d] for d in sorted(snap)},
    }
    if not sv.started:
        result["error"] = "seeding has not been started (serve command not running)"
    elif not_running:
        result["error"] = f"{len(not_running)} blob(s) without a running seeder"
    return result


def _instances(sv: Any) -> dict[str, Any]:
    """This process among the registry instances sharing the database (docs/instances.md): who it is, whether it
    leads (runs GC, retention and the scrubber), and every instance known, live or not (rows go a day after their
    last heartbeat). Informational: only a database that cannot be read fails it."""
    me = sv.instances
    result: dict[str, Any] = {"ok": True, "id": me.id, "leader": me.is_leader(), "shared": me.shared}
    try:
        rows = me.listing()
    except Exception as exc:  # noqa: BLE001 - a health check reports, it does not raise
        return {**result, "ok": False, "error": f"cannot list the instances: {exc}"}
    now = utcnow()
    listed = [{"id": r.id, "url": r.url, "hostname": r.hostname, "pid": r.pid, "version": r.version,
               "leader": r.leader, "seen_at": r.seen_at.isoformat(), "started_at": r.started_at.isoformat(),
               "live": r.seen_at >= now - me.live_for or r.id == me.id} for r in rows]
    result.update(live=sum(1 for r in listed if r["live"]), dead=sum(1 for r in listed if not r["live"]),
                  instances=listed[:MAX_LISTED])
    return result


def report(sv: Any) -> tuple[bool, dict[str, Any]]:
    """(ok, checks): what /healthz answers (the web page shows it too)."""
    blobs = _blobs(sv)
    try:
        tracker = sv.swarm.tracker.check()
    except Exception as exc:  # noqa: BLE001
        tracker = {"ok": False, "error": str(exc)}
    checks = {
        "database": _database(sv),
        "blob_store": _blob_store(sv, blobs),
        "disk_space": _disk_space(sv),
        "tracker": tracker,
        "seeders": _seeders(sv, blobs),
        "instances": _instances(sv),
    }
    return all(c["ok"] for c in checks.values()), checks


def instance_report(sv: Any) -> tuple[bool, dict[str, Any]]:
    """(ok, checks) for a load balancer choosing between instances (``/healthz?scope=instance``): only what
    differs between them: this process serves, reaches the database, and can write the location. What they share
    (the tracker, the volume's free space, a damaged blob) would take every instance out of rotation at once
    and turn a degraded registry into an outage; the full ``/healthz`` reports those."""
    writable = sv.store.writable()
    checks = {"database": _database(sv),
              "blob_store": {"ok": writable, "writable": writable},
              "serving": {"ok": bool(sv.started)}}
    if not checks["blob_store"]["ok"]:
        checks["blob_store"]["error"] = f"{sv.store.location} is not writable"
    if not sv.started:
        checks["serving"]["error"] = "the serve command has not started (or is stopping)"
    return all(c["ok"] for c in checks.values()), checks


@bp.get("/healthz")
def healthz() -> tuple[Response, int]:
    """Every check (``?scope=instance``: only this instance's own, for a load balancer's health check)."""
    scope = request.args.get("scope", "registry")
    if scope not in ("registry", "instance"):
        raise InvalidRequest(f"unknown scope {scope[:50]!r}", "use scope=instance (a load balancer's check) or none")
    sv = current_app.extensions["docket"]
    ok, checks = instance_report(sv) if scope == "instance" else report(sv)
    auth = current_app.extensions.get("docket_auth")
    if auth is not None and not auth.may_read():  # read tokens: digests, pids and ports are for token holders
        return jsonify({"status": "ok" if ok else "degraded"}), 200 if ok else 503
    return jsonify({"status": "ok" if ok else "degraded", "checks": checks}), 200 if ok else 503


def openapi_document() -> str:
    """The checked-in document (read per request: small, and no module-level cache)."""
    return resources.files("docket.registry").joinpath("openapi.json").read_text(encoding="utf-8")


@bp.get("/openapi.json")
def openapi() -> Response:
    return Response(openapi_document(), mimetype="application/json")

