"""The dispatcher's loop survives what it did not foresee: it logs it and ticks again."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest

from api_service.dispatcher import Dispatcher, TickReport
from api_service.publisher import TaskPublisher
from shared.settings import Settings


class Flaky(Dispatcher):
    """Fails its first tick the way a bug would; stops the loop on the second."""

    def __init__(self, settings: Settings, stop: asyncio.Event) -> None:
        super().__init__(settings, cast(Any, None), cast(TaskPublisher, None))
        self.stop = stop
        self.ticks = 0

    async def tick(self, now: datetime | None = None) -> TickReport:
        self.ticks += 1
        if self.ticks == 1:
            raise KeyError("Mars/Olympus")
        self.stop.set()
        return TickReport([], 0, 0, 0)


async def test_an_unforeseen_error_is_logged_and_the_next_tick_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    heartbeat = tmp_path / "dispatcher.heartbeat"
    settings = Settings(dispatcher_interval=0.01, dispatcher_heartbeat_file=str(heartbeat))
    stop = asyncio.Event()
    dispatcher = Flaky(settings, stop)
    try:
        await asyncio.wait_for(dispatcher.run(stop), 10)
    finally:
        await dispatcher.sender.close()
    assert dispatcher.ticks == 2
    assert heartbeat.exists()  # the tick after the failure reached the end
    assert any("Mars/Olympus" in (r.exc_text or "") for r in caplog.records)
