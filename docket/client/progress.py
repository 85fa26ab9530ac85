"""Progress display chosen by context: a rich bar on a terminal, plain lines when piped, nothing with --quiet.

Orchestration code only calls ``Reporter.info`` and ``Reporter.task(...).update(...)``; it never knows which
display is behind them.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Protocol

from rich.console import Console
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from docket.units import human_bytes


def printable(text: str, limit: int = 2000) -> str:
    """Remote text made safe for a terminal: control and format characters (ESC, CR, newline, bidi overrides)
    as ``\\x1b``-style escapes, at most ``limit`` characters. A registry or tracker must not clear the screen,
    retitle the window, hide text or print a fake success line."""
    out = []
    for ch in text[:limit]:
        if ch.isprintable():
            out.append(ch)
        else:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
    return "".join(out) + ("..." if len(text) > limit else "")


def printable_lines(text: str, limit: int = 100_000) -> str:
    """``printable`` line by line: our own multi-line messages keep their newlines, remote text in them (a
    tracker URL from a .torrent, a fallback reason) cannot move the cursor or print a line of its own."""
    return "\n".join(printable(line, limit) for line in text.split("\n"))


class Task(Protocol):
    def update(self, completed: int, rate: float | None = None) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Task: ...
    def __exit__(self, *exc: object) -> None: ...


class Reporter(Protocol):
    def info(self, text: str) -> None: ...
    def warning(self, text: str) -> None: ...
    def task(self, description: str, total: int | None) -> Task: ...


class _TaskBase:
    def __enter__(self) -> _TaskBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def update(self, completed: int, rate: float | None = None) -> None:
        pass


class SilentReporter:
    """--quiet: nothing but errors (and --json output, written elsewhere)."""

    def info(self, text: str) -> None:
        pass

    def warning(self, text: str) -> None:
        pass

    def task(self, description: str, total: int | None) -> Task:
        return _TaskBase()  # type: ignore[return-value]


class _PlainTask(_TaskBase):
    def __init__(self, out: IO[str], description: str, total: int | None, interval: float) -> None:
        self.out, self.description, self.total, self.interval = out, description, total, interval
        self.start = time.monotonic()
        self.last_print = self.start
        self.last_step = 0
        self.completed = 0
        self.raw = 0
        self.rate: float | None = None
        self.closed = False

    def _line(self) -> str:
        parts = []
        if self.total:
            parts.append(f"{human_bytes(self.completed)} of {human_bytes(self.total)}")
        else:
            parts.append(human_bytes(self.completed))
        rate = self.rate
        if rate is None:
            elapsed = time.monotonic() - self.start
            rate = self.completed / elapsed if elapsed > 0 else None
        if rate is not None:
            parts.append(f"{human_bytes(rate)}/s")
        pct = f" {min(100, int(self.completed * 100 / self.total))}%" if self.total else ""
        return f"{self.description}:{pct} ({', '.join(parts)})"

    def update(self, completed: int, rate: float | None = None) -> None:
        self.raw = completed
        if self.total:
            completed = min(completed, self.total)
        self.completed, self.rate = completed, rate
        now = time.monotonic()
        step = int(completed * 10 / self.total) if self.total else 0
        since = now - self.last_print
        if (step > self.last_step and since >= 1.0) or since >= self.interval:
            self.last_step, self.last_print = max(step, self.last_step), now
            if not (self.total and completed >= self.total):  # the final line comes from close()
                print(self._line(), file=self.out, flush=True)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        elapsed = time.monotonic() - self.start
        rate = f", {human_bytes(self.raw / elapsed)}/s" if elapsed > 0 and self.raw else ""
        print(f"{self.description}: {human_bytes(self.raw)} in {elapsed:.1f} s{rate}", file=self.out, flush=True)


class PlainReporter:
    """Not a terminal: a progress line every 10 % or ``interval`` seconds, on ``out`` (stderr)."""

    def __init__(self, out: IO[str] | None = None, interval: float = 5.0) -> None:
        self.out = out or sys.stderr
        self.interval = interval

    def info(self, text: str) -> None:
        print(printable_lines(text), file=self.out, flush=True)

    def warning(self, text: str) -> None:
        """Something the user should know (e.g. the pull switched to HTTP); the pull goes on."""
        print(f"Warning: {printable_lines(text)}", file=self.out, flush=True)

    def task(self, description: str, total: int | None) -> Task:
        return _PlainTask(self.out, printable(description, 500), total, self.interval)  # type: ignore[return-value]


class _RichTask(_TaskBase):
    def __init__(self, console: Console, description: str, total: int | None) -> None:
        self.total = total
        self.progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=console, transient=False,
        )
        self.progress.start()
        self.task_id = self.progress.add_task(printable(description, 500), total=total)

    def update(self, completed: int, rate: float | None = None) -> None:
        if self.total:
            completed = min(completed, self.total)
        self.progress.update(self.task_id, completed=completed)

    def close(self) -> None:
        self.progress.stop()


class RichReporter:
    """A terminal: rich progress bars (bytes, rate, ETA) on the console (stderr)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def info(self, text: str) -> None:
        self.console.print(printable_lines(text), highlight=False, markup=False, soft_wrap=True)

    def warning(self, text: str) -> None:
        self.console.print(f"Warning: {printable_lines(text)}", style="yellow", highlight=False, markup=False,
                           soft_wrap=True)

    def task(self, description: str, total: int | None) -> Task:
        return _RichTask(self.console, description, total)  # type: ignore[return-value]


def choose_reporter(quiet: bool, is_tty: bool, console: Console | None = None,
                    out: IO[str] | None = None) -> Reporter:
    if quiet:
        return SilentReporter()
    if is_tty:
        return RichReporter(console or Console(stderr=True))
    return PlainReporter(out)
