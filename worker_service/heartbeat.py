"""A file the consumer touches every second: the worker's liveness probe (not a broadcast ping)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps

from worker_service.runtime import current_runtime

INTERVAL = 1.0
LOOP_STALL_SECONDS = 60.0
"""A threads-pool worker whose shared event loop has not run this long is not alive: every
scan of the process waits on it."""
log = logging.getLogger(__name__)


class Heartbeat(bootsteps.StartStopStep):
    """Runs on the consumer's own timer, so a wedged consumer stops the heartbeat too (and, in
    a threads-pool worker, a wedged event loop)."""

    requires = ("celery.worker.consumer.mingle:Mingle",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.path = Path(parent.app.conf.cybersec_settings.heartbeat_file)
        self.tref: Any = None

    def start(self, parent: Any) -> None:
        self.touch()
        self.tref = parent.timer.call_repeatedly(INTERVAL, self.touch)

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def touch(self) -> None:
        runtime = current_runtime()
        if runtime is not None and runtime.threaded:
            stalled = time.monotonic() - runtime.beat
            if stalled > LOOP_STALL_SECONDS:
                log.error("the event loop has not run for %.0f s: heartbeat withheld", stalled)
                return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        os.utime(self.path)


def install_heartbeat(app: Celery) -> None:
    app.steps["consumer"].add(Heartbeat)
