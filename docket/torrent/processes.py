"""Stopping the helper processes we start: our own children, and those a killed previous run left behind.

Only a pid we started or recorded ourselves is signalled; for a previous run's, only when /proc still shows the
program we started with our own marker (a path of ours) in its command line: a recycled pid is left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def record_pid(pid_file: Path, pid: int) -> None:
    tmp = pid_file.with_suffix(".tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, pid_file)


def stop_orphan(pid_file: Path, program: str, marker: str, timeout: float = 5.0) -> bool:
    """Stop the process recorded in ``pid_file`` if it is still ``program`` with ``marker`` in its argv.

    Returns True when a process was stopped. The pid file is removed either way.
    """
    try:
        pid = int(pid_file.read_text().strip())
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        with contextlib.suppress(OSError):
            pid_file.unlink()
        return False
    stopped = False
    if argv and os.path.basename(argv[0]) == program.encode() and any(marker.encode() in a for a in argv):
        log.warning("stopping %s pid %d left by a previous run", program, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
                time.sleep(0.1)
            if Path(f"/proc/{pid}").exists():
                os.kill(pid, signal.SIGKILL)
        stopped = True
    with contextlib.suppress(OSError):
        pid_file.unlink()
    return stopped


def stop_child(proc: subprocess.Popen, timeout: float,
               signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGKILL), gap: float | None = None) -> None:
    """Send ``signals`` in turn to our child, waiting ``timeout`` after each (10 s after SIGKILL).

    ``gap``: wait only that long after the first signal (then ``timeout`` after the others).
    """
    for i, sig in enumerate(signals):
        if proc.poll() is not None:
            return
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(10.0 if sig == signal.SIGKILL else gap if i == 0 and gap is not None else timeout)
            return
        except subprocess.TimeoutExpired:
            log.info("pid %d still running %.0f s after %s", proc.pid, timeout, signal.Signals(sig).name)
