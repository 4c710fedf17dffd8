"""The hard time limit of a threads-pool worker: a delivery that outlives it ends the process.

In the prefork pool Celery kills the child that holds a task past its hard limit. Nothing can
kill one thread of a process, so with ``CYBERSEC_WORKER_POOL=threads`` a delivery stuck where
asyncio cannot cancel it (a blocking call on its thread or on the shared loop) would hold its
slot for ever. The watchdog logs which delivery it was and exits the whole process: the
supervisor starts it again and the broker redelivers every message it held (late acks), each
counted by the poison guard as one lost delivery.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

EXIT_HARD_LIMIT = 70
"""The process's exit status when a delivery outlived its hard limit (EX_SOFTWARE)."""


class Watchdog:
    """Checks every ``interval`` s that no watched delivery is past its deadline."""

    def __init__(self, *, interval: float = 1.0, exit: Callable[[int], object] = os._exit) -> None:
        self.interval = interval
        self._exit = exit
        self._deadlines: dict[int, tuple[str, float]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cybersec-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, what: str, seconds: float) -> Iterator[None]:
        """Hold the enclosed work to ``seconds`` from now."""
        key = next(self._ids)
        with self._lock:
            self._deadlines[key] = (what, time.monotonic() + seconds)
        try:
            yield
        finally:
            with self._lock:
                self._deadlines.pop(key, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            with self._lock:
                late = sorted(what for what, end in self._deadlines.values() if end <= now)
            if late:
                log.critical(
                    "%s outlived its hard time limit: the process exits so that the broker"
                    " redelivers every scan it held",
                    ", ".join(late),
                )
                for handler in logging.getLogger().handlers:
                    handler.flush()
                self._exit(EXIT_HARD_LIMIT)
                return
