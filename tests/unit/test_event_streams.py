"""The per-key and per-process bounds on event streams, and the one watcher that ends them."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import cast
from uuid import UUID, uuid4

import pytest
import redis.asyncio as aioredis

from api_service.errors import ApiError
from api_service.events import EventStreams
from shared.schemas import ScanStatus
from shared.store import ScanStore


class Ended:
    """A store whose only query answers which of the asked tasks ended; counts the calls."""

    def __init__(self) -> None:
        self.ended: set[UUID] = set()
        self.calls = 0

    async def ended_among(self, task_ids: Sequence[UUID]) -> set[UUID]:
        self.calls += 1
        return self.ended & set(task_ids)


def streams(store: Ended, *, per_key: int = 2, total: int = 3) -> EventStreams:
    redis = cast(aioredis.Redis, object())  # never read by these tests
    return EventStreams(redis, cast(ScanStore, store), per_key=per_key, total=total)


async def _status() -> ScanStatus:
    raise AssertionError("not read")


async def _connected() -> bool:
    return False


def test_bounds_per_key_and_per_process_and_idempotent_release() -> None:
    bounded = streams(Ended())
    one, two = uuid4(), uuid4()
    first = bounded.acquire(one)
    bounded.acquire(one)
    with pytest.raises(ApiError, match="2 event streams already open for this key"):
        bounded.acquire(one)
    bounded.acquire(two)
    with pytest.raises(ApiError, match="too many event streams open") as over:
        bounded.acquire(uuid4())
    assert over.value.status == 429
    first()
    first()  # a second release gives nothing back twice
    assert bounded.open_count == 2
    bounded.acquire(one)


async def test_a_stream_never_read_gives_its_slot_back() -> None:
    """Starlette may drop a response body before its first chunk (a client gone at once)."""
    bounded = streams(Ended(), per_key=1)
    owner = uuid4()
    body = bounded.stream(
        owner, uuid4(), "0-0", _status, _connected, prefix="t:", ended_already=False
    )
    assert bounded.open_count == 1
    del body
    gc.collect()
    assert bounded.open_count == 0
    bounded.acquire(owner)


async def test_one_query_answers_for_every_watched_stream() -> None:
    store = Ended()
    bounded = streams(store, per_key=100, total=100)
    tasks = [uuid4() for _ in range(50)]
    events = [bounded.watch(task) for task in tasks]
    store.ended = set(tasks[:10])
    await bounded.check_once()
    assert store.calls == 1
    assert [event.is_set() for event in events] == [True] * 10 + [False] * 40
    for task, event in zip(tasks, events, strict=True):
        bounded.unwatch(task, event)
    await bounded.check_once()
    assert store.calls == 1  # nothing watched: no query at all
