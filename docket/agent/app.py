"""The agent's HTTP edge: the read side of the Registry V2 / OCI distribution API, for the local dockerd,
containerd or kubelet.

``create_app(agent)`` builds the Flask app around one ``Agent`` (service.py), kept in ``app.extensions``.
Manifests, tag lists and the catalog come from the registry (manifests checked against their digest; by-digest
answers cached on disk); blobs are served from the agent's cache once held and verified (fetcher.py). Every read
first asks the registry (a HEAD) whether this client may see it and whether it exists: the registry stays the
one that decides, and its 401/403/404 reach the client as they were. Writes answer 405 ``UNSUPPORTED``.
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from docket import errors
from docket.agent.metrics import AgentMetrics
from docket.reference import ANY_DIGEST_RE
from docket.registry.bodies import _ReleaseOnClose, send_ranged_file
from docket.registry.v2 import API_VERSION_HEADER, validate_name

log = logging.getLogger(__name__)

bp = Blueprint("agent_v2", __name__, url_prefix="/v2")

TAG_RE = re.compile(r"\A[\w][\w.-]{0,127}\Z")
MANIFEST_TYPES = ("application/vnd.docker.distribution.manifest.v2+json, "
                  "application/vnd.docker.distribution.manifest.list.v2+json, "
                  "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json")
BLOB_MAX_AGE = 31536000
WRITE_METHODS = ["PUT", "POST", "PATCH", "DELETE"]


def _agent() -> Any:
    return current_app.extensions["docket_agent"]


def v2_error(status: int, code: str, message: str, detail: Any = None,
             headers: dict[str, str] | None = None) -> Response:
    resp = jsonify({"errors": [{"code": code, "message": message, "detail": detail or {}}]})
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _check_name(name: str) -> None:
    try:
        validate_name(name)
    except errors.DocketError as exc:
        raise _Refused(v2_error(400, "NAME_INVALID", exc.message)) from exc


class _Refused(Exception):
    def __init__(self, response: Response) -> None:
        self.response = response


def _passthrough(answer: Any, method: str, code: str, what: str) -> Response:
    """The registry's refusal as it was (status, WWW-Authenticate, body); a HEAD's empty body gets ours."""
    if answer.body or method == "HEAD":
        resp = Response(answer.body, status=answer.status,
                        content_type=answer.headers.get("Content-Type", "application/json"))
    else:
        known = {401: "UNAUTHORIZED", 403: "DENIED", 404: code}
        resp = v2_error(answer.status, known.get(answer.status, "UNKNOWN"),
                        f"the registry answered {answer.status} for {what}")
    if "WWW-Authenticate" in answer.headers:
        resp.headers["WWW-Authenticate"] = answer.headers["WWW-Authenticate"]
    return resp


@bp.after_request
def _version_header(resp: Response) -> Response:
    resp.headers.setdefault(*API_VERSION_HEADER)
    return resp


@bp.get("/")
def version_check() -> Response:
    answer = _agent().upstream.request("GET", "/v2/", authorization=request.headers.get("Authorization"),
                                       small=True)
    if answer.ok:
        return jsonify({})
    return _passthrough(answer, "GET", "UNKNOWN", "/v2/")


@bp.get("/_catalog")
def catalog() -> Response:
    return _forward("/v2/_catalog")


@bp.get("/<path:name>/tags/list")
def tags(name: str) -> Response:
    _check_name(name)
    return _forward(f"/v2/{name}/tags/list")


def _forward(path: str) -> Response:
    # containerd adds ?ns=<registry host> when it asks a mirror: it is ours to ignore, not the registry's
    query = "&".join(p for p in request.query_string.decode("ascii", "replace").split("&")
                     if p and not p.startswith("ns="))
    answer = _agent().upstream.request("GET", path, authorization=request.headers.get("Authorization"), query=query)
    resp = Response(answer.body, status=answer.status,
                    content_type=answer.headers.get("Content-Type", "application/json"))
    for h in ("Link", "WWW-Authenticate"):
        if h in answer.headers:
            resp.headers[h] = answer.headers[h]
    return resp


@bp.route("/<path:name>/manifests/<reference>", methods=["GET", "HEAD"])
def manifest(name: str, reference: str) -> Response:
    _check_name(name)
    agent = _agent()
    by_digest = bool(ANY_DIGEST_RE.fullmatch(reference))
    if not by_digest and not TAG_RE.fullmatch(reference):
        return v2_error(400, "MANIFEST_INVALID" if ":" not in reference else "DIGEST_INVALID",
                        f"invalid tag or digest {reference[:200]!r}")
    auth = request.headers.get("Authorization")
    path = f"/v2/{name}/manifests/{reference}"
    accept = {"Accept": request.headers.get("Accept") or MANIFEST_TYPES}
    if by_digest:
        cached = agent.store.manifest(reference)
        if cached is not None:
            head = agent.upstream.request("HEAD", path, authorization=auth, headers=accept)
            if not head.ok:
                return _passthrough(head, request.method, "MANIFEST_UNKNOWN", f"manifest {reference}")
            agent.count("manifests_cached")
            return _manifest_answer(cached[0], cached[1], reference)
    if request.method == "HEAD" and not by_digest:
        head = agent.upstream.request("HEAD", path, authorization=auth, headers=accept)
        resp = Response(status=head.status)
        for h in ("Content-Type", "Docker-Content-Digest", "Content-Length", "WWW-Authenticate"):
            if h in head.headers:
                resp.headers[h] = head.headers[h]
        return resp
    answer = agent.upstream.request("GET", path, authorization=auth, headers=accept)
    if not answer.ok:
        return _passthrough(answer, request.method, "MANIFEST_UNKNOWN", f"manifest {reference}")
    algorithm = reference.split(":", 1)[0] if by_digest else "sha256"
    digest = f"{algorithm}:{hashlib.new(algorithm, answer.body).hexdigest()}"
    said = answer.headers.get("Docker-Content-Digest")
    if (by_digest and digest != reference) or (said and said.split(":", 1)[0] == algorithm and said != digest):
        log.warning("manifest %s of %s from the registry has digest %s (promised %s): refused", reference, name,
                    digest, said or reference)
        return v2_error(502, "DIGEST_INVALID", f"the registry's manifest {reference} of {name} does not match its "
                        f"digest (got {digest}); nothing was served")
    media_type = answer.headers.get("Content-Type", "application/vnd.docker.distribution.manifest.v2+json")
    agent.store.keep_manifest(digest, answer.body, media_type)
    agent.count("manifests_fetched")
    return _manifest_answer(answer.body, media_type, digest)


def _manifest_answer(body: bytes, media_type: str, digest: str) -> Response:
    resp = Response(b"" if request.method == "HEAD" else body, status=200, content_type=media_type)
    resp.headers["Docker-Content-Digest"] = digest
    resp.headers["ETag"] = f'"{digest}"'
    if request.method == "HEAD":
        resp.headers["Content-Length"] = str(len(body))
    return resp


@bp.route("/<path:name>/blobs/<digest>", methods=["GET", "HEAD"])
def blob(name: str, digest: str) -> Response:
    _check_name(name)
    if not ANY_DIGEST_RE.fullmatch(digest):
        return v2_error(400, "DIGEST_INVALID", f"invalid digest {digest[:200]!r}")
    agent = _agent()
    auth = request.headers.get("Authorization")
    head = agent.upstream.request("HEAD", f"/v2/{name}/blobs/{digest}", authorization=auth)
    if not head.ok:
        return _passthrough(head, request.method, "BLOB_UNKNOWN", f"blob {digest} of {name}")
    try:
        size = int(head.headers["Content-Length"])
        if size < 0:  # int() takes "-1": no blob has that size, and the download plan would be nonsense
            raise ValueError(size)
    except (KeyError, ValueError):
        return v2_error(502, "UNKNOWN", f"the registry gave no valid size for blob {digest}")
    if request.method == "HEAD":
        resp = Response(status=200, content_type="application/octet-stream")
        resp.headers.update({"Content-Length": str(size), "Docker-Content-Digest": digest, "Accept-Ranges": "bytes"})
        return resp
    # only a verified record is trusted here; anything else (a pull's blob, a half-written file) goes to the
    # fetcher, which hashes it once under the blob's lock or downloads it (never a hash per request)
    held = agent.store.verified(digest, size, check=False)
    hit = held is not None  # served from the cache (metrics)
    if held is None:
        agent.fetcher.get(digest, size, auth, agent.config.blob_timeout)
        held = agent.store.verified(digest, size, check=False)
        if held is None:
            return v2_error(503, "UNAVAILABLE", f"blob {digest} was evicted before it could be sent; retry")
    agent.store.touch(digest)
    release = agent.store.reading(digest)
    try:
        resp = send_ranged_file(held.blob, mimetype="application/octet-stream", etag=digest, max_age=BLOB_MAX_AGE)
    except FileNotFoundError:
        release()
        return v2_error(503, "UNAVAILABLE", f"blob {digest} was evicted before it could be sent; retry")
    except BaseException:
        release()
        raise
    resp.response = _ReleaseOnClose(resp.response, release)
    resp.headers["Docker-Content-Digest"] = digest
    agent.served(digest, resp.content_length or 0)
    if resp.status_code in (200, 206):  # a 304 or 416 sends no blob
        current_app.extensions["docket_agent_metrics"].sending_blob(resp, hit=hit)
    return resp


@bp.route("/", methods=WRITE_METHODS)
@bp.route("/<path:rest>", methods=["GET", "HEAD", *WRITE_METHODS])
def read_only(rest: str = "") -> Response:
    if request.method in ("GET", "HEAD"):
        return v2_error(404, "NOT_FOUND", f"no such /v2 route: {request.path[:300]!r}")
    return v2_error(405, "UNSUPPORTED", "docket agent serves pulls only: push to the registry at "
                    f"{_agent().upstream.url} (docker push, or docket push with DOCKET_HOST)",
                    headers={"Allow": "GET, HEAD"})


def create_app(agent: Any) -> Flask:
    """The agent's WSGI app around one ``Agent`` (service.py)."""
    app = Flask("docket.agent")
    app.extensions["docket_agent"] = agent
    AgentMetrics(agent).init_app(app)  # GET /metrics; counts every request
    app.register_blueprint(bp)

    @app.get("/_docket/agent")
    def status() -> Response:
        return jsonify(agent.status())

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"ok": agent.healthy(), "seeding": len(agent.seeder.seeding)})

    @app.errorhandler(_Refused)
    def refused(exc: _Refused) -> Response:
        return exc.response

    @app.errorhandler(errors.DocketError)
    def docket_error(exc: errors.DocketError) -> Response:
        status = exc.status if exc.status >= 400 else 500
        if isinstance(exc, (errors.IntegrityError, errors.TransferError)):
            status = 502  # the registry or the swarm gave bad bytes or none: the client retries
        code = "UNAVAILABLE" if status in (502, 503) else exc.code
        log.warning("%s %s: %s", request.method, request.path, exc.message)
        return v2_error(status, code, str(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = {404: "NOT_FOUND", 405: "UNSUPPORTED"}.get(exc.code or 500, "UNKNOWN")
        return v2_error(exc.code or 500, code, exc.description or exc.name)

    return app
