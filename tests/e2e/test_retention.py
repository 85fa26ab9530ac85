"""Tag deletion and retention with a real registry process (push token, --keep-tags 1 --keep-pattern 'v1*'), real
dockerd and the real `docket` command: `docket rm` (its refusals change nothing), `docket images` and `docket pull`
after it, `docket retention` as a dry run and applied, and a bad pattern refused at start-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import requests

from tests.support.procs import free_port, tail
from tests.support.registry_server import RegistryServer
from tests.support.tools import need

TOKEN = "retention-push-token-0123456789"


def _env(token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DOCKET_TOKEN", "DOCKET_TOKEN_FILE")}
    if token:
        env["DOCKET_TOKEN"] = token
    return env


def test_rm_and_retention(tmp_path: Path, image_factory, docket_cli) -> None:
    need("ctorrent")
    need("opentracker")
    server = RegistryServer(location=tmp_path / "registry", port=free_port(), tracker_port=free_port(),
                            log=tmp_path / "registry.log",
                            extra_args=["--auth-token", TOKEN, "--keep-tags", "1", "--keep-pattern", "v1*",
                                        "--gc-interval", "0", "--scrub-interval", "0"])
    server.start()
    try:
        _run(server, tmp_path, image_factory, docket_cli)
    finally:
        server.stop()


def _run(server: RegistryServer, tmp_path: Path, image_factory, docket_cli) -> None:
    def cli(*args: str, token: str | None = TOKEN, check: bool = True) -> subprocess.CompletedProcess:
        return docket_cli(*args, registry=server, env=_env(token), check=check)

    repo = f"docket-test/ret{os.getpid()}"
    markers = {}
    for tag in ("v1.0", "a", "b", "c"):  # pushed in this order: c is the newest
        ref, markers[tag] = image_factory.build(f"{repo}:{tag}", data_mib=0.25)
        cli("push", ref)

    def listed() -> list[str]:
        return sorted(r["ref"] for r in json.loads(cli("images", "--json").stdout))

    every = sorted(f"{repo}:{t}" for t in ("v1.0", "a", "b", "c"))
    assert listed() == every

    # refusals: nothing is deleted
    no_token = cli("rm", f"{repo}:a", token=None, check=False)
    assert no_token.returncode == 5 and "refused access" in no_token.stderr and "DOCKET_TOKEN" in no_token.stderr
    unknown = cli("rm", f"{repo}:a", f"{repo}:nope", check=False)
    assert unknown.returncode == 4 and f"{repo}:nope is not in the registry" in unknown.stderr
    untagged = cli("rm", repo, check=False)
    assert untagged.returncode == 2 and "names no tag" in untagged.stderr
    bad = cli("rm", "Bad/Name:x", check=False)
    assert bad.returncode == 2 and "invalid repository name" in bad.stderr
    assert listed() == every

    deleted = cli("rm", f"{repo}:a")
    assert deleted.stdout.startswith(f"Deleted {repo}:a (sha256:")
    assert listed() == sorted(f"{repo}:{t}" for t in ("v1.0", "b", "c"))
    image_factory.remove(f"{repo}:a")  # rm leaves local images alone; the pull below must not find it locally
    gone = cli("pull", f"{repo}:a", "--seed-time", "0", check=False)
    assert gone.returncode == 4 and f"{repo}:a is not in the registry" in gone.stderr
    image_factory.remove(f"{repo}:b")
    cli("pull", f"{repo}:b", "--seed-time", "0")
    assert image_factory.run(f"{repo}:b") == markers["b"]

    # retention: --keep-tags 1 keeps c (newest), v1.0 matches the keep pattern; b goes
    dry = cli("retention")
    assert f"Would remove {repo}:b (sha256:" in dry.stdout and f"{repo}:c" not in dry.stdout
    assert "1 tag(s) would be removed, 2 kept" in dry.stderr
    answer = requests.post(f"{server.url}/api/v1/admin/retention", headers={"Authorization": f"Bearer {TOKEN}"},
                           timeout=30).json()
    assert answer["dry_run"] is True and [r["tag"] for r in answer["removed"]] == ["b"]
    assert answer["policy"] == {"keep_tags": 1, "keep_patterns": ["v1*"]} and answer["kept"] == 2
    assert requests.post(f"{server.url}/api/v1/admin/retention", timeout=30).status_code == 401
    assert listed() == sorted(f"{repo}:{t}" for t in ("v1.0", "b", "c"))

    applied = json.loads(cli("retention", "--apply", "--json").stdout)
    assert applied["dry_run"] is False and [r["tag"] for r in applied["removed"]] == ["b"]
    assert listed() == sorted(f"{repo}:{t}" for t in ("v1.0", "c"))
    assert cli("retention").stdout == ""  # nothing more would go
    log = server.log.read_text()
    assert f"retention: removed {repo}:b (digest sha256:" in log, tail(server.log)


def test_bad_keep_pattern_stops_start_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "docket.registry.cli", "--location", str(tmp_path / "registry"), "--port",
         str(free_port()), "--bind", "127.0.0.1", "--advertise-address", "127.0.0.1", "--no-seeding",
         "--keep-tags", "2", "--keep-pattern", "v1 *"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "invalid keep pattern 'v1 *'" in result.stderr and "shell glob" in result.stderr
    assert not (tmp_path / "registry" / "docket.db").exists()  # nothing started
