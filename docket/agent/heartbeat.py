"""The agent's heartbeat: every few seconds ``PUT /api/v1/hosts/<host-id>`` to its registry with what it holds and
serves (docket/registry/hosts.py stores it), so ``docket hosts`` and the registry's web page list the fleet.

It goes through the agent's ``Upstream`` (a deadline on every call, the agent's token). A failed heartbeat is a
warning in the log, at most one a minute while the registry stays unreachable, and never stops the agent.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from docket import __version__, errors
from docket.registry.periodic import Periodic

if TYPE_CHECKING:
    from docket.agent.service import Agent

log = logging.getLogger(__name__)

MAX_DIGESTS = 1000  # the registry's limit (docket/registry/hosts.py MAX_DIGESTS); counts cover the rest
WARN_EVERY = 60.0  # seconds between warnings while heartbeats fail
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
HOST_ID = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")  # as the registry checks it (registry/hosts.py)


def validate_host_id(host_id: str) -> str:
    if not HOST_ID.match(host_id):
        raise errors.InvalidRequest(f"invalid host id {host_id[:140]!r}",
                                    "1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return host_id


def default_host_id() -> str:
    """This machine's host name, made a valid host id (one agent per host; give --host-id to run several)."""
    name = _UNSAFE.sub("-", socket.gethostname()).strip(".-_")[:128]
    return name or "host"


class Heartbeat:
    def __init__(self, agent: Agent, host_id: str, interval: float) -> None:
        self.agent = agent
        self.host_id = host_id
        self.interval = interval
        self.sent = 0
        self.failures = 0
        self._last_warning = float("-inf")
        self._announce: str | None = None
        self._timer = Periodic("heartbeat", interval, self.beat, first_at_start=True)

    def start(self) -> None:
        self._timer.start()  # interval 0: disabled, nothing started

    def stop(self) -> None:
        self._timer.stop(timeout=1)  # a heartbeat stuck on a hung registry ends by its own deadline (daemon thread)

    def body(self) -> dict[str, Any]:
        agent = self.agent
        held = agent.store.held()
        status_totals = agent.status()["totals"]
        outcomes = list(agent.fetcher.outcomes)
        return {
            "hostname": socket.gethostname()[:255] or "?",
            "listen_address": f"{agent.config.listen_host}:{agent.config.listen_port}",
            "peer_address": self._peer_address(),
            "version": __version__,
            "interval": self.interval,
            "started": datetime.fromtimestamp(agent.started, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "blobs": {"count": len(held), "bytes": sum(h.size for h in held),
                      "digests": sorted(h.digest for h in held)[:MAX_DIGESTS]},
            "served": {"count": status_totals.get("blobs_served", 0), "bytes": status_totals.get("bytes_served", 0)},
            "downloaded": {"count": status_totals.get("downloads", 0),
                           "bytes": sum(o.bytes_from_peers + o.bytes_from_http for o in outcomes)},
        }

    def _peer_address(self) -> str | None:
        """The address the agent's torrents use towards the registry's tracker (asked once)."""
        if self.agent.config.peer_ip:
            return self.agent.config.peer_ip
        if self._announce is None:
            answer = self.agent.upstream.request("GET", "/api/v1/tracker", small=True, limit=64 * 1024)
            if not answer.ok:
                return None
            try:
                self._announce = str(json.loads(answer.body)["announce_url"])
            except (ValueError, KeyError, TypeError):
                return None
        return self.agent.fetcher.peer_ip(self._announce)

    def beat(self) -> bool:
        """One heartbeat; True when the registry took it. Never raises."""
        try:
            answer = self.agent.upstream.request(
                "PUT", f"/api/v1/hosts/{self.host_id}", data=json.dumps(self.body()).encode(),
                headers={"Content-Type": "application/json"}, small=True, limit=256 * 1024)
            if not answer.ok:
                raise errors.ServiceUnavailable(f"the registry answered {answer.status}: "
                                                f"{answer.body[:200].decode('utf-8', 'replace')}")
        except Exception as exc:  # noqa: BLE001 - a heartbeat never stops the agent
            self.failures += 1
            now = time.monotonic()
            if now - self._last_warning >= WARN_EVERY:
                self._last_warning = now
                log.warning("heartbeat to %s failed (%d in a row): %s", self.agent.upstream.url, self.failures,
                            getattr(exc, "message", None) or exc)
            return False
        if self.failures:
            log.info("heartbeat to %s works again after %d failure(s)", self.agent.upstream.url, self.failures)
        self.failures = 0
        self._last_warning = float("-inf")
        self.sent += 1
        return True
