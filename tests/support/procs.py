"""Test helpers for real processes: free ports, polling without fixed sleeps, managed children."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError with ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # noqa: BLE001 - keep polling, report the last one
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what or predicate}: {last_exc!r}")


def pid_gone(pid: int) -> bool:
    """True when ``pid`` no longer exists (or is a zombie nobody will reap: not ours then)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def port_open(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: only this pid, which we started."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(5)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.contextmanager
def managed_process(
    args: Sequence[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Iterator[subprocess.Popen]:
    """Run a child with output to ``log_path``; stop it on exit and show the log's tail if the body failed."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(args), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, cwd=cwd,
        )
    try:
        yield proc
    except BaseException:
        print(f"--- tail of {log_path} ---\n{tail(log_path)}")
        raise
    finally:
        stop_process(proc)


def process_argvs() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, argv) of every process we may read (/proc), those that end meanwhile skipped."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        yield int(entry.name), raw.rstrip(b"\0").split(b"\0")


def background_seeders() -> dict[int, Path]:
    """Running background seeders (``docket.client.seedd``): pid -> their location."""
    return {pid: Path(os.fsdecode(argv[-1])) for pid, argv in process_argvs()
            if len(argv) >= 2 and b"docket.client.seedd" in argv[:-1]}


def stop_background_seeders(started_after: set[int], under: Path) -> list[int]:
    """Stop the background seeders a test's pulls started (not in ``started_after``, location under ``under``:
    our own, never another worker's); their pids."""
    from docket.client import background

    stopped = []
    for pid, location in background_seeders().items():
        if pid not in started_after and location.is_relative_to(under):
            with contextlib.suppress(Exception):
                background.stop(location, timeout=20)
            if not pid_gone(pid):  # its location was removed: the pid alone is left
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            stopped.append(pid)
    return stopped
