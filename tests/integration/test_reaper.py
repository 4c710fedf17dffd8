"""A reaped scan's task ends FAILURE in the real Redis, with its end event and slot release."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import orjson
import pytest
import redis

from shared.reaper import REAPED, Reaped
from shared.redis_keys import active_key, events_key
from shared.settings import Settings
from worker_service.backend import ScanResultBackend
from worker_service.celery_app import make_celery
from worker_service.reaper import Reaper


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(settings.redis_url)
    yield connection
    connection.close()


def test_a_reaped_scan_reads_failed_from_the_result_backend(
    settings: Settings, client: redis.Redis
) -> None:
    backend = make_celery(settings).backend
    assert isinstance(backend, ScanResultBackend)
    owner = uuid4()
    scan = Reaped(uuid4(), uuid4(), owner)
    task_id = str(scan.task_id)
    slots = active_key(settings.redis_prefix, owner)
    client.zadd(slots, {task_id: time.time() + 60})
    # The last thing the worker stored before it was lost: progress.
    assert backend.finish(task_id, "PROGRESS", {"progress": 40}, lambda _pipe, _state: None)
    assert backend.get_task_meta(task_id)["status"] == "PROGRESS"
    try:
        Reaper(settings, backend)._release(client, scan)
        meta = backend.get_task_meta(task_id)
        assert meta["status"] == "FAILURE"
        assert REAPED in str(meta["result"])
        entries: list[Any] = client.xrange(events_key(settings.redis_prefix, task_id)) or []
        assert [orjson.loads(f[b"data"]) for _i, f in entries][-1] == {"state": "FAILURE"}
        assert client.zscore(slots, task_id) is None
    finally:
        client.delete(backend.get_key_for_task(task_id), slots)
        client.delete(events_key(settings.redis_prefix, task_id))
