"""External tools the tests need: under CI (CI=true) a missing tool fails the test, elsewhere it skips it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
BUSYBOX = Path("/bin/busybox")


def program(name: str) -> str:
    """A console script pip installed (pyproject [project.scripts]: docket, docket-registry, docket-tracker), next to
    this interpreter: tests start the programs users run, not only their modules."""
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is not installed beside {sys.executable}: pip install -e ."
    return str(path)


def need(tool: str) -> str:
    """Path of ``tool``; fail under CI, skip elsewhere, when it is missing."""
    path = shutil.which(tool) or (str(BUSYBOX) if tool == "busybox" and BUSYBOX.exists() else None)
    if path:
        return path
    msg = f"{tool} is not installed (run scripts/install_tracker.sh or .ci/run)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)


def docker_cli(*args: str, config: Path, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
    """The docker CLI against the test daemon, with a private config dir (credentials never leak to ~/.docker)."""
    env = {**os.environ, "DOCKER_CONFIG": str(config)}
    result = subprocess.run([need("docker"), *args], capture_output=True, text=True, env=env, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result
