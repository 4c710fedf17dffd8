"""The dead-letter guard fails the right scan; the reaper's thread outlives any error."""

from __future__ import annotations

import logging
from typing import Any, cast
from uuid import uuid4

import pytest
import redis

from shared.protocol import MERGE_TASK, SCAN_TASK, SHARD_TASK
from shared.reaper import Reaped
from shared.settings import Settings
from worker_service.backend import ScanResultBackend
from worker_service.celery_app import make_celery
from worker_service.guard import scan_task_id
from worker_service.reaper import Reaper


def test_a_shard_or_merge_message_fails_its_parent_scan_not_itself() -> None:
    parent = str(uuid4())
    payload = {"scan_id": str(uuid4())}
    assert scan_task_id({"task": SCAN_TASK, "id": "scan-1"}, None) == "scan-1"
    shard = [[payload, parent, 3], {}, {}]
    assert scan_task_id({"task": SHARD_TASK, "id": "shard-1"}, shard) == parent
    merge: tuple[Any, ...] = ([payload, parent], {}, {})
    assert scan_task_id({"task": MERGE_TASK, "id": "merge-1"}, merge) == parent
    # Undecodable: no parent to read; never the message's own id.
    assert scan_task_id({"task": SHARD_TASK, "id": "shard-1"}, None) is None
    assert scan_task_id({"task": MERGE_TASK, "id": "merge-1"}, [{"a": 1}, {}, {}]) is None
    assert scan_task_id(None, None) is None


class BrokenReaper(Reaper):
    def __init__(self, error: Exception, reaped: list[Reaped] | None = None) -> None:
        super().__init__(Settings())
        self.error = error
        self.reaped = reaped

    async def _pass(self) -> list[Reaped]:
        if self.reaped is not None:
            return self.reaped
        raise self.error

    def _release(self, client: redis.Redis, scan: Reaped) -> None:
        raise self.error


@pytest.mark.parametrize("error", [RuntimeError("a bug"), KeyError("x"), ValueError("y")])
def test_the_reaper_survives_any_error_of_a_pass(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    client = cast(redis.Redis, None)
    with caplog.at_level(logging.ERROR, "worker_service.reaper"):
        assert BrokenReaper(error).tick(client) == []
        scan = Reaped(uuid4(), uuid4(), None)
        assert BrokenReaper(error, [scan]).tick(client) == [scan]
    assert [r.exc_info is not None for r in caplog.records] == [True, True]


def test_the_reaper_takes_the_workers_backend_when_it_starts() -> None:
    class Consumer:
        app = make_celery(Settings())

    reaper = Reaper(Settings())
    reaper._thread = cast(Any, object())  # started already: start() only picks the backend
    reaper.start(sender=Consumer())
    assert isinstance(reaper.backend, ScanResultBackend)
