"""Stopping the helper processes we start: our own children, and those a killed previous run left behind.

Only a pid we started or recorded ourselves is signalled; for a previous run's, only when /proc still shows the
program we started with our own marker (a path of ours) in its command line: a recycled pid is left alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


PR_SET_PDEATHSIG = 1
_libc: Any = None


def _die_with_parent(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when the thread that forked it ends (``PR_SET_PDEATHSIG``), and
    ends at once when its parent is already gone (the race between fork and prctl)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)  # loaded before fork: the child only calls into it
    prctl = _libc.prctl

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
            os._exit(127)

    return preexec


class _Spawner:
    """One thread that lives as long as the process and forks every child that must die with it.

    PR_SET_PDEATHSIG fires when the forking *thread* ends, not the process: a child started from a short-lived
    thread (a reseed, an HTTP fallback) would be killed with that thread. Starting them all here ties them to
    the process; the thread is started at the first spawn, so a later thread shortage cannot stop a child from
    being started safely (it cannot be started at all instead).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], list[Any], threading.Event]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def run(self, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="child-spawner", daemon=True)
                self._thread.start()
        if threading.current_thread() is self._thread:
            return fn()
        box: list[Any] = []
        done = threading.Event()
        self._jobs.put((fn, box, done))
        done.wait()
        kind, value = box[0]
        if kind == "error":
            raise value
        return value

    def _loop(self) -> None:
        while True:
            fn, box, done = self._jobs.get()
            try:
                box.append(("ok", fn()))
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                box.append(("error", exc))
            finally:
                done.set()


_SPAWNER = _Spawner()


def popen_tied(args: Sequence[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` for a child that must not outlive this process (SIGKILL, SIGHUP, a crash): it gets
    SIGKILL from the kernel when we end, so no orphan keeps writing or seeding our files."""
    return _SPAWNER.run(lambda: subprocess.Popen(list(args), preexec_fn=_die_with_parent(os.getpid()), **kwargs))


def signal_all(procs: Sequence[subprocess.Popen], sig: signal.Signals) -> None:
    """Send ``sig`` to each child still running (no thread, no allocation beyond the loop)."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, OSError):
                proc.send_signal(sig)


def wait_all(procs: Sequence[subprocess.Popen], timeout: float) -> bool:
    """Poll until every child has exited or ``timeout`` passed; True when all are gone."""
    deadline = time.monotonic() + timeout
    while True:
        if all(proc.poll() is not None for proc in procs):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def stop_children(procs: Sequence[subprocess.Popen], timeout: float,
                  signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL)) -> None:
    """``stop_child`` for many children at once, from the calling thread: each signal goes to all, then one
    wait of ``timeout`` for all (10 s after SIGKILL). Cleanup that needs no new thread cannot fail for want of one.
    """
    for sig in signals:
        signal_all(procs, sig)
        if wait_all(procs, 10.0 if sig == signal.SIGKILL else timeout):
            return
