"""One background thread that runs a job every ``interval`` seconds until stopped.

GC, the scrubber and the seeder supervisor share this lifecycle: start once, a pass that fails is logged
and the next one still runs, ``stop()`` wakes the thread at once and joins it. ``when``: a guard asked before
each timed pass (GC, retention and the scrubber run only while this instance leads: docs/instances.md); a
direct call of the job (an admin trigger) does not ask it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class Periodic:
    def __init__(self, name: str, interval: float, job: Callable[[], object], *, first_at_start: bool = False,
                 when: Callable[[], bool] | None = None) -> None:
        self.name = name
        self.interval = interval
        self.job = job
        self.first_at_start = first_at_start
        self.when = when  # None: every pass runs
        self.stopping = threading.Event()  # jobs check it to give up a long pass early
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the thread (not when already running, nor when ``interval`` <= 0: disabled)."""
        if self._thread is not None or self.interval <= 0:
            return
        self.stopping.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None

    def _run(self) -> None:
        if self.first_at_start:
            self._pass()
        while not self.stopping.wait(self.interval):
            self._pass()

    def _pass(self) -> None:
        try:
            if self.when is not None and not self.when():
                return  # not ours to run now (another instance leads)
            self.job()
        except Exception:  # noqa: BLE001 - the thread must outlive any one failure; next pass runs
            log.exception("%s: pass failed", self.name)
