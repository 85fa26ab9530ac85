"""External tools the tests need: under CI (CI=true) a missing tool fails the test, elsewhere it skips it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
BUSYBOX = Path("/bin/busybox")


def need(tool: str) -> str:
    """Path of ``tool``; fail under CI, skip elsewhere, when it is missing."""
    path = shutil.which(tool) or (str(BUSYBOX) if tool == "busybox" and BUSYBOX.exists() else None)
    if path:
        return path
    msg = f"{tool} is not installed (run scripts/install_tracker.sh or .ci/run)"
    if IN_CI:
        pytest.fail(msg)
    pytest.skip(msg)
