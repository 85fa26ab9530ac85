"""The README's promises: the demo command works, docker-compose.yml is valid, the install script is sane."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.procs import free_port
from tests.support.tools import need

ROOT = Path(__file__).resolve().parents[2]


def test_compose_file_is_valid():
    compose = need("docker-compose")
    result = subprocess.run([compose, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True,
                            text=True, cwd=ROOT, env={**os.environ, "DOCKET_ADVERTISE_ADDRESS": "198.18.0.1"})
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)
    assert set(config["services"]) == {"tracker", "registry"}
    registry_cmd = config["services"]["registry"]["command"]
    assert "--tracker=198.18.0.1:6969" in registry_cmd
    assert "docket-tracker" in config["services"]["tracker"]["command"]


def test_scripts_are_valid_bash():
    for script in [*sorted((ROOT / "scripts").glob("*.sh")), ROOT / ".ci" / "run"]:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_demo_command_pushes_and_pulls(docker_host: str, tmp_path: Path):
    """README command 1, run as a newcomer would (with free ports and DEMO_EXIT=1 so it stops)."""
    need("ctorrent")
    need("opentracker")
    if not (ROOT / ".venv" / "bin" / "docket").exists() and not shutil.which("apt-get"):
        pytest.skip("demo needs scripts/setup.sh (apt) to install itself")
    env = {**os.environ, "DOCKER_HOST": docker_host, "DEMO_EXIT": "1", "DEMO_DIR": str(tmp_path / "demo"),
           "DOCKET_PORT": str(free_port()), "DOCKET_TRACKER_PORT": str(free_port())}
    # .ci/run exports the pid of the dockerd it started: the demo must never stop a daemon it did not start
    bystander = subprocess.Popen(["sleep", "600"])
    env["DOCKET_DOCKERD_PID"] = str(bystander.pid)
    try:
        result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], stdin=subprocess.DEVNULL,
                                capture_output=True, text=True, env=env, timeout=600)
        assert bystander.poll() is None, "demo.sh stopped a process it did not start"
    finally:
        bystander.kill()
        bystander.wait()
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert "hello from a docket pull" in result.stdout
    assert "docket-demo/hello:v1" in result.stdout
    assert f"127.0.0.1:{env['DOCKET_PORT']}/docket-demo/hello:v1" in result.stdout  # docker pull printed the ref
    assert f"the web page: http://127.0.0.1:{env['DOCKET_PORT']}/" in result.stdout
    assert f"the metrics: http://127.0.0.1:{env['DOCKET_PORT']}/metrics" in result.stdout
    pushes = [line for line in result.stdout.splitlines() if line.startswith("docket_pushes_total")]
    assert pushes and any(float(line.rsplit(" ", 1)[1]) >= 1 for line in pushes), result.stdout
