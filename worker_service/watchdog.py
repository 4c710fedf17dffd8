"""The hard time limit of a threads-pool worker: a delivery that outlives it ends the process.

In the prefork pool Celery kills the child that holds a task past its hard limit. Nothing can
kill one thread of a process, so with ``CYBERSEC_WORKER_POOL=threads`` a delivery stuck where
asyncio cannot cancel it (a blocking call on its thread or on the shared loop) would hold its
slot for ever. The watchdog logs which delivery it was and exits the whole process: the
supervisor starts it again and the broker redelivers every message it held (late acks). Just
before, it counts the other deliveries of the process as released (bounded: a database that
hangs does not hold the exit), so the poison guard counts a lost delivery against the late
one only, not against the innocent scans that shared its process.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

EXIT_HARD_LIMIT = 70
"""The process's exit status when a delivery outlived its hard limit (EX_SOFTWARE)."""
RELEASE_WAIT_SECONDS = 4.0
"""Longest the exit waits for the other deliveries to be counted as released."""


class Watchdog:
    """Checks every ``interval`` s that no watched delivery is past its deadline.

    ``release`` gets the keys of the watched deliveries still in time, before the exit."""

    def __init__(
        self,
        *,
        interval: float = 1.0,
        exit: Callable[[int], object] = os._exit,
        release: Callable[[list[Any]], object] | None = None,
    ) -> None:
        self.interval = interval
        self._exit = exit
        self._release = release
        self._deadlines: dict[int, tuple[str, float, Any]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cybersec-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def watch(self, what: str, seconds: float, key: Any = None) -> Iterator[None]:
        """Hold the enclosed work to ``seconds`` from now; ``key`` is what ``release`` gets
        for it (None: nothing to release)."""
        number = next(self._ids)
        with self._lock:
            self._deadlines[number] = (what, time.monotonic() + seconds, key)
        try:
            yield
        finally:
            with self._lock:
                self._deadlines.pop(number, None)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval + 1)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = time.monotonic()
            with self._lock:
                watched = list(self._deadlines.values())
            late = sorted(what for what, end, _key in watched if end <= now)
            if late:
                log.critical(
                    "%s outlived its hard time limit: the process exits so that the broker"
                    " redelivers every scan it held",
                    ", ".join(late),
                )
                innocent = [key for _what, end, key in watched if end > now and key is not None]
                if innocent and self._release is not None:
                    self._release_bounded(innocent)
                for handler in logging.getLogger().handlers:
                    handler.flush()
                self._exit(EXIT_HARD_LIMIT)
                return

    def _release_bounded(self, keys: list[Any]) -> None:
        release = self._release
        assert release is not None

        def run() -> None:
            try:
                release(keys)
            except Exception:  # the exit must come whatever happens here
                log.exception("deliveries not counted as released before the exit")

        # On a daemon thread: a name lookup or a connect that hangs does not hold the exit.
        thread = threading.Thread(target=run, name="cybersec-release", daemon=True)
        thread.start()
        thread.join(RELEASE_WAIT_SECONDS)
