"""Prometheus pieces the registry and ``docket agent`` share: per-request counters and latency, counted response
bodies, what a pull is, and the ``/metrics`` answer.

A top-level module (prometheus_client and Flask only) so that the agent gets them without importing the registry.
Every metric lives on the ``CollectorRegistry`` of one app (never prometheus_client's global one): two apps in one
process (the tests) count apart. Label values are bounded: a route is its Flask rule (``/v2/<path:name>/blobs/
<digest>``) or ``unmatched``, never a repository, tag or digest; a method outside the HTTP verbs is ``other``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

from flask import Flask, Response, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

METHODS = frozenset({"GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
_START = "docket.metrics.start"  # request.environ keys
_DONE = "docket.metrics.done"
FLUSH_EVERY = 4 * 1024 * 1024  # a long download shows in the byte counters while it runs, not only at its end
# what a pull asks for last: an image's manifest (an index or list only points at one per platform)
IMAGE_MANIFEST_TYPES = frozenset({"application/vnd.oci.image.manifest.v1+json",
                                  "application/vnd.docker.distribution.manifest.v2+json"})
PULL_HELP = ("a GET answered 200 with an image manifest (/v2, not an index) or an image record "
             "(GET /api/v1/repositories/<repository>/tags/<tag>, what `docket pull` asks first)")


def route_of() -> str:
    """The current request's rule, or ``unmatched`` (a 404 of the router): bounded whatever the path."""
    rule = request.url_rule
    return rule.rule if rule is not None else UNMATCHED


def method_of() -> str:
    return request.method if request.method in METHODS else "other"


class RequestMetrics:
    """``docket_http_requests_total{route,method,status}`` and ``docket_http_request_duration_seconds{route,
    method}`` (until the response is made; a blob's body streams after that) for every request of one app."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("docket_http_requests", "HTTP requests answered, by route rule, method and status",
                                ["route", "method", "status"], registry=registry)
        self.duration = Histogram("docket_http_request_duration_seconds",
                                  "Time from a request's arrival to its response (before the body streams)",
                                  ["route", "method"], registry=registry)

    def init_app(self, app: Flask) -> None:
        # first of all before-request functions: a refusal by an earlier one (auth, request shape) skips the rest
        app.before_request_funcs.setdefault(None, []).insert(0, self._start)
        app.after_request(self._finish)
        app.teardown_request(self._teardown)

    @staticmethod
    def _start() -> None:
        request.environ[_START] = time.perf_counter()

    def _record(self, status: int) -> None:
        env = request.environ
        if env.get(_DONE):
            return
        env[_DONE] = True
        route, method = route_of(), method_of()
        self.requests.labels(route, method, str(status)).inc()
        started = env.get(_START)
        if started is not None:
            self.duration.labels(route, method).observe(time.perf_counter() - started)

    def _finish(self, resp: Response) -> Response:
        self._record(resp.status_code)
        return resp

    def _teardown(self, exc: BaseException | None) -> None:
        """A request whose response was never finished (an after-request function raised) counts as a 500."""
        self._record(500)


class CountedBody:
    """A response body that reports the bytes it hands to the server (``add(n)``: every FLUSH_EVERY bytes and at
    the end), then closes the body it wraps. What a client aborts is counted up to where it stopped."""

    def __init__(self, inner: Any, add: Callable[[int], None]) -> None:
        self._inner = inner
        self._add = add
        self._pending = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._pending += len(chunk)
            if self._pending >= FLUSH_EVERY:
                self._flush()
            yield chunk

    def _flush(self) -> None:
        pending, self._pending = self._pending, 0
        if pending:
            self._add(pending)

    def close(self) -> None:
        try:
            self._flush()
        finally:
            close = getattr(self._inner, "close", None)
            if close is not None:
                close()


def count_body(resp: Response, add: Callable[[int], None]) -> Response:
    """Count the bytes of ``resp``'s body as the server sends them (a file body stays streamed)."""
    resp.response = CountedBody(resp.response, add)
    return resp


def pulled_bytes(resp: Response) -> int | None:
    """The size (config and layers) of the image a GET answered with, when the answer is a pull (``PULL_HELP``);
    else None. Reads the manifest or record already in memory (at most a few MiB)."""
    if request.method != "GET" or resp.status_code != 200 or resp.direct_passthrough or resp.is_streamed:
        return None
    record = request.path.startswith("/api/v1/") and route_of().endswith("/tags/<tag>")
    if not record and resp.mimetype not in IMAGE_MANIFEST_TYPES:
        return None
    try:
        doc = json.loads(resp.get_data())
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    if record and doc.get("format") == "tarball":  # a whole-tarball record: one blob of that size
        return _size(doc)
    if record and doc.get("format") != "layers":
        return None  # an index or artifact record: nothing docket pulls
    layers = doc.get("layers")
    return _size(doc.get("config")) + sum(_size(layer) for layer in (layers if isinstance(layers, list) else []))


def _size(part: Any) -> int:
    size = part.get("size") if isinstance(part, dict) else None
    return size if isinstance(size, int) and size > 0 else 0


def exposition(registry: CollectorRegistry) -> Response:
    """The ``/metrics`` answer: prometheus_client's text format of ``registry``."""
    resp = Response(generate_latest(registry), status=200)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    resp.headers["Cache-Control"] = "no-store"
    return resp
