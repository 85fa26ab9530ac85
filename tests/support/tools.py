"""External tools the tests need: under CI (CI=true) a missing tool fails the test, elsewhere it skips it."""

from __future__ import annotations

import os
import shutil
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
