"""The agent's heartbeat (docket/agent/heartbeat.py) against a registry that is down, then the real registry app
over real HTTP on loopback: failures are one warning, not one per beat, and never raise; what it sends is what
the registry stores (docket/registry/hosts.py)."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from werkzeug.serving import make_server

from docket.agent.heartbeat import Heartbeat, default_host_id, validate_host_id
from docket.agent.service import Agent, AgentConfig
from docket.errors import InvalidRequest
from docket.registry.hosts import HOST_ID
from tests.support.apps import close_app, registry_app
from tests.support.procs import free_port


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[str]:
    """The registry app (no seeding) served over HTTP on a free loopback port."""
    app = registry_app(tmp_path / "registry", tracker_port=free_port())
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(10)
        close_app(app)


def agent_for(url: str, tmp_path: Path) -> Agent:
    return Agent(AgentConfig(registry=url, cache_dir=tmp_path / "cache", cache_size=1 << 30, seed_engine="ctorrent",
                             peer_ip="127.0.0.5", listen_port=5123))


def test_failures_warn_once_and_never_raise_then_the_registry_stores_what_was_sent(
        registry: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead = agent_for(f"http://127.0.0.1:{free_port()}", tmp_path / "dead")
    beat = Heartbeat(dead, "web01", 5.0)
    with caplog.at_level(logging.WARNING, logger="docket.agent.heartbeat"):
        assert [beat.beat() for _ in range(3)] == [False, False, False]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "heartbeat" in warnings[0].getMessage() and beat.failures == 3
    dead.upstream.close()

    agent = agent_for(registry, tmp_path / "live")
    data = b"a held blob"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    agent.store.blob_path(digest).write_bytes(data)
    agent.store.workdir(digest)
    agent.store.mark_verified(digest)
    agent.served(digest, 11)
    beat = Heartbeat(agent, "web01", 5.0)
    try:
        assert beat.beat() and beat.sent == 1
        hosts = requests.get(f"{registry}/api/v1/hosts", timeout=10).json()["hosts"]
        assert len(hosts) == 1
        host = hosts[0]
        assert host["id"] == "web01" and host["state"] == "ok" and host["interval"] == 5.0
        assert host["listen_address"] == "127.0.0.1:5123" and host["peer_address"] == "127.0.0.5"
        assert host["blobs"] == {"count": 1, "bytes": len(data)}
        one = requests.get(f"{registry}/api/v1/hosts/web01", timeout=10).json()
        assert one["blobs"] == {"count": 1, "bytes": len(data), "digests": [digest]}
        assert host["served"] == {"count": 1, "bytes": 11}
    finally:
        agent.upstream.close()


def test_a_disabled_heartbeat_sends_nothing(registry: str, tmp_path: Path) -> None:
    agent = agent_for(registry, tmp_path)
    beat = Heartbeat(agent, "quiet", 0)
    beat.start()
    beat.stop()
    assert beat.sent == 0 and requests.get(f"{registry}/api/v1/hosts", timeout=10).json()["hosts"] == []
    agent.upstream.close()


def test_host_ids() -> None:
    assert HOST_ID.match(default_host_id())  # what the agent sends by default, the registry takes
    assert validate_host_id("web-01.prod_a") == "web-01.prod_a"
    for bad in ("", "-x", "a b", "a/b", "x" * 129):
        with pytest.raises(InvalidRequest):
            validate_host_id(bad)


@pytest.mark.parametrize("args, message", [
    (["--heartbeat-interval", "0.05"], "at least 0.1"), (["--heartbeat-interval", "-1"], "--heartbeat-interval"),
    (["--host-id", "no spaces"], "invalid host id"), (["--host-id", "x" * 129], "invalid host id"),
])
def test_bad_heartbeat_options_are_refused_before_anything_starts(tmp_path: Path, args: list[str],
                                                                   message: str) -> None:
    from click.testing import CliRunner

    from docket.client.cli import cli

    result = CliRunner().invoke(cli, ["--location", str(tmp_path), "agent", "--listen", f"127.0.0.1:{free_port()}",
                                      *args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "seeder").exists()  # nothing started
