"""A file the consumer touches every second: the worker's liveness probe (not a broadcast ping)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from celery import Celery, bootsteps

INTERVAL = 1.0


class Heartbeat(bootsteps.StartStopStep):
    """Runs on the consumer's own timer, so a wedged consumer stops the heartbeat too."""

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()
        os.utime(self.path)


def install_heartbeat(app: Celery) -> None:
    app.steps["consumer"].add(Heartbeat)
