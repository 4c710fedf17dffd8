"""Schedules on the real PostgreSQL and RabbitMQ: exactly-once firing with two dispatchers,
edits while a run is due, exclusions. Dispatchers are ticked with explicit times, years ahead
of the wall clock, so no real-time dispatcher of the same run ever sees these schedules."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import asyncpg
import orjson
import pytest

from api_service.dispatcher import Dispatcher, ScheduleCheck
from api_service.publisher import AmqpPublisher
from shared.policy import TargetPolicy
from shared.protocol import LimitPolicy, TaskMessage
from shared.schedule_store import ScheduleStore
from shared.schedules import Refusal, Schedule, ScheduleCreate, ScheduleUpdate
from shared.schemas import ScanTaskPayload
from shared.settings import Settings
from shared.store import create_pool
from tests.conftest import delete_queues
from tests.support.broker import queued_messages
from tests.support.keys import own_key, revoke

BASE = datetime(2031, 1, 6, 0, 0, tzinfo=UTC)


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    pool = await create_pool(database, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def owner(pool: asyncpg.Pool[Any]) -> AsyncIterator[UUID]:
    async with own_key(pool, "schedules-test") as key_id:
        yield key_id


@pytest.fixture
async def own_queue(settings: Settings) -> AsyncIterator[Settings]:
    own = settings.model_copy(
        update={"queue_prefix": f"{settings.queue_prefix}-sched-{secrets.token_hex(3)}"}
    )
    yield own
    await delete_queues(own)


async def make(store: ScheduleStore, owner: UUID, spec: ScheduleCreate) -> Schedule:
    created = await store.create(owner, spec, BASE, limit=100)
    assert created is not None
    return created


def nightly(**changes: Any) -> ScheduleCreate:
    return ScheduleCreate.model_validate(
        {"target": "127.0.0.1", "ports": "22", "cron": "0 3 * * *", **changes}
    )


async def test_two_dispatchers_never_double_fire(
    database: str, pool: asyncpg.Pool[Any], owner: UUID, own_queue: Settings
) -> None:
    store = ScheduleStore(pool)
    count = 12
    for _ in range(count):
        await make(store, owner, nightly())
    due_at = BASE + timedelta(hours=3, seconds=5)

    dispatchers: list[Dispatcher] = []
    publishers: list[AmqpPublisher] = []
    pools: list[asyncpg.Pool[Any]] = []
    try:
        for _ in range(2):
            own_pool = await create_pool(database, max_size=2)
            publisher = AmqpPublisher(own_queue)
            await publisher.start()
            pools.append(own_pool)
            publishers.append(publisher)
            dispatchers.append(Dispatcher(own_queue, own_pool, publisher))
        # Both tick at the same instants, three times over, concurrently.
        for extra in range(3):
            now = due_at + timedelta(seconds=extra)
            await asyncio.gather(*(d.tick(now) for d in dispatchers))
    finally:
        for d in dispatchers:
            await d.sender.close()
        for publisher in publishers:
            await publisher.close()
        for own_pool in pools:
            await own_pool.close()

    rows = await pool.fetch(
        "SELECT schedule_id, scheduled_for FROM scans WHERE api_key_id = $1", owner
    )
    assert len(rows) == count
    assert len({r["schedule_id"] for r in rows}) == count
    assert {r["scheduled_for"] for r in rows} == {BASE + timedelta(hours=3)}
    assert await pool.fetchval("SELECT count(*) FROM scan_publish_outbox") == 0
    assert await queued_messages(own_queue) == count
    for schedule in await store.owned(owner):
        assert schedule.next_run_at == BASE + timedelta(days=1, hours=3)


async def test_editing_the_timing_while_a_run_is_due_drops_that_run(
    pool: asyncpg.Pool[Any], owner: UUID, settings: Settings
) -> None:
    store = ScheduleStore(pool)
    schedule = await make(store, owner, nightly())
    due = BASE + timedelta(hours=3)
    # Due, not yet fired (no tick since 03:00); the edit at 03:00:30 moves it to 04:00.
    edited = await store.update(
        owner, schedule.id, ScheduleUpdate(cron="0 4 * * *"), due + timedelta(seconds=30)
    )
    assert edited is not None
    assert edited.next_run_at == BASE + timedelta(hours=4)
    check = ScheduleCheck(settings)
    assert await store.fire_due(due + timedelta(minutes=1), check) == []
    fired = await store.fire_due(BASE + timedelta(hours=4, seconds=1), check)
    assert [run.scheduled_for for run in fired] == [BASE + timedelta(hours=4)]


async def test_editing_the_target_while_a_run_is_due_keeps_the_run(
    pool: asyncpg.Pool[Any], owner: UUID, settings: Settings
) -> None:
    store = ScheduleStore(pool)
    schedule = await make(store, owner, nightly())
    due = BASE + timedelta(hours=3)
    await store.update(owner, schedule.id, ScheduleUpdate(target="127.0.0.2"), due)
    fired = await store.fire_due(due + timedelta(seconds=1), ScheduleCheck(settings))
    assert len(fired) == 1
    target = await pool.fetchval("SELECT target FROM scans WHERE id = $1", fired[0].scan_id)
    assert target == "127.0.0.2"
    await pool.execute("DELETE FROM scan_publish_outbox WHERE scan_id = $1", fired[0].scan_id)


async def test_an_edit_during_a_ticks_check_is_not_held_up_and_wins(
    pool: asyncpg.Pool[Any], owner: UUID, settings: Settings
) -> None:
    """The tick checks a run (a name lookup, perhaps) holding no lock: an edit made meanwhile
    goes through at once, and the tick, finding the row changed, records nothing: the run due
    under the old timing is dropped, as for any timing edit."""
    store = ScheduleStore(pool)
    schedule = await make(store, owner, nightly())
    due = BASE + timedelta(hours=3)
    entered, release = asyncio.Event(), asyncio.Event()
    check = ScheduleCheck(settings)

    async def slow_check(s: Schedule) -> Refusal | None:
        entered.set()
        await release.wait()
        return await check(s)

    tick = asyncio.create_task(store.fire_due(due, slow_check))
    await asyncio.wait_for(entered.wait(), 10)
    edited = await asyncio.wait_for(
        store.update(owner, schedule.id, ScheduleUpdate(cron="0 5 * * *"), due), 10
    )
    release.set()
    assert await asyncio.wait_for(tick, 10) == []
    assert edited is not None
    assert edited.next_run_at == BASE + timedelta(hours=5)
    assert await pool.fetchval("SELECT count(*) FROM scans WHERE api_key_id = $1", owner) == 0


async def test_a_run_inside_the_schedules_exclusions_is_recorded_as_failed(
    pool: asyncpg.Pool[Any], owner: UUID, settings: Settings
) -> None:
    store = ScheduleStore(pool)
    await make(store, owner, nightly(exclude=["127.0.0.0/24"]))
    fired = await store.fire_due(BASE + timedelta(hours=3), ScheduleCheck(settings))
    assert len(fired) == 1
    row = await pool.fetchrow("SELECT state, error FROM scans WHERE id = $1", fired[0].scan_id)
    assert row is not None
    assert row["state"] == "failed"
    assert "127.0.0.0/24" in row["error"]
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM scan_publish_outbox WHERE scan_id = $1", fired[0].scan_id
        )
        == 0
    )


async def test_a_key_has_at_most_its_bound_of_schedules(
    pool: asyncpg.Pool[Any], owner: UUID
) -> None:
    store = ScheduleStore(pool)
    assert await store.create(owner, nightly(), BASE, limit=2) is not None
    assert await store.create(owner, nightly(), BASE, limit=2) is not None
    assert await store.create(owner, nightly(), BASE, limit=2) is None
    assert len(await store.owned(owner)) == 2


async def test_a_revoked_keys_schedules_stop_firing(
    pool: asyncpg.Pool[Any], owner: UUID, settings: Settings
) -> None:
    store = ScheduleStore(pool)
    await make(store, owner, nightly())
    await revoke(pool, owner)
    fired = await store.fire_due(BASE + timedelta(days=1, hours=3), ScheduleCheck(settings))
    assert fired == []
    assert await pool.fetchval("SELECT count(*) FROM scans WHERE api_key_id = $1", owner) == 0


async def test_a_bad_row_is_parked_and_the_good_ones_still_fire(
    pool: asyncpg.Pool[Any], owner: UUID, settings: Settings
) -> None:
    store = ScheduleStore(pool)
    good = [await make(store, owner, nightly()) for _ in range(2)]
    bad = await make(store, owner, nightly())
    # A zone the time zone database no longer has: ZoneInfo raises a KeyError for it.
    await pool.execute("UPDATE schedules SET timezone = 'Mars/Olympus' WHERE id = $1", bad.id)
    fired = await store.fire_due(BASE + timedelta(hours=3), ScheduleCheck(settings))
    assert {run.schedule_id for run in fired} == {s.id for s in good}
    parked = await store.get(owner, bad.id)
    assert parked is not None
    assert parked.next_run_at is None
    assert parked.parked_reason is not None
    assert "Mars/Olympus" in parked.parked_reason
    await pool.execute("DELETE FROM scan_publish_outbox")


async def test_concurrent_creates_stay_within_the_keys_bound(
    pool: asyncpg.Pool[Any], owner: UUID
) -> None:
    store = ScheduleStore(pool)
    made = await asyncio.gather(*(store.create(owner, nightly(), BASE, limit=5) for _ in range(20)))
    assert sum(1 for m in made if m is not None) == 5
    assert len(await store.owned(owner)) == 5


async def test_a_transient_resolution_failure_is_retried_within_the_grace_period(
    pool: asyncpg.Pool[Any], owner: UUID
) -> None:
    store = ScheduleStore(pool)
    await make(store, owner, nightly(misfire_grace_seconds=300))
    due = BASE + timedelta(hours=3)
    answers = [Refusal("x.test did not resolve", "unresolvable_target", transient=True), None]

    async def flaky(_schedule: Schedule) -> Refusal | None:
        return answers.pop(0)

    assert await store.fire_due(due + timedelta(seconds=1), flaky) == []
    assert await pool.fetchval("SELECT count(*) FROM scans WHERE api_key_id = $1", owner) == 0
    fired = await store.fire_due(due + timedelta(seconds=3), flaky)
    assert [(run.scheduled_for, run.error) for run in fired] == [(due, None)]
    await pool.execute("DELETE FROM scan_publish_outbox WHERE scan_id = $1", fired[0].scan_id)


async def test_a_resolution_still_failing_after_the_grace_period_is_recorded_as_failed(
    pool: asyncpg.Pool[Any], owner: UUID
) -> None:
    store = ScheduleStore(pool)
    await make(store, owner, nightly(misfire_grace_seconds=60, misfire_policy="run_once"))

    async def unresolvable(_schedule: Schedule) -> Refusal | None:
        return Refusal("x.test did not resolve", "unresolvable_target", transient=True)

    fired = await store.fire_due(BASE + timedelta(hours=3, minutes=5), unresolvable)
    assert len(fired) == 1
    assert fired[0].error is not None
    assert "did not resolve" in fired[0].error


async def test_a_run_carries_the_schedules_exclusions_to_the_worker(
    pool: asyncpg.Pool[Any], owner: UUID, settings: Settings
) -> None:
    store = ScheduleStore(pool)
    await make(store, owner, nightly(target="localhost", exclude=["10.0.0.0/8"]))
    fired = await store.fire_due(BASE + timedelta(hours=3), ScheduleCheck(settings))
    assert [run.error for run in fired] == [None]
    sent: list[TaskMessage] = []

    async def publish(message: TaskMessage) -> bool:
        sent.append(message)
        return True

    await store.publish_pending(publish, limits=LimitPolicy(60, 30, 0), only=[fired[0].scan_id])
    (args, _kwargs, _embed) = orjson.loads(sent[0].body)
    payload = ScanTaskPayload.model_validate(args[0])
    assert payload.version == 2
    assert payload.exclude == ("10.0.0.0/8",)
    assert (
        TargetPolicy(own=())
        .excluding(payload.exclude)
        .deny.match_address(ipaddress.ip_address("10.1.2.3"))
    )


async def test_an_edit_unparks_a_schedule(
    pool: asyncpg.Pool[Any], owner: UUID, settings: Settings
) -> None:
    store = ScheduleStore(pool)
    bad = await make(store, owner, nightly())
    await pool.execute("UPDATE schedules SET timezone = 'Mars/Olympus' WHERE id = $1", bad.id)
    await store.fire_due(BASE + timedelta(hours=3), ScheduleCheck(settings))
    edited = await store.update(
        owner, bad.id, ScheduleUpdate(timezone="Europe/Berlin"), BASE + timedelta(hours=4)
    )
    assert edited is not None
    assert edited.parked_reason is None
    assert edited.next_run_at is not None


async def test_a_tick_is_not_held_up_by_an_edits_check(
    pool: asyncpg.Pool[Any], owner: UUID, settings: Settings
) -> None:
    """An edit checks its merged schedule (a name lookup, perhaps) holding no lock: a tick
    meanwhile fires the due run, and the edit, finding the row changed, merges again."""
    store = ScheduleStore(pool)
    schedule = await make(store, owner, nightly())
    due = BASE + timedelta(hours=3)
    entered, release = asyncio.Event(), asyncio.Event()
    checks: list[str] = []

    async def slow_check(merged: ScheduleCreate) -> None:
        checks.append(merged.target)
        entered.set()
        await release.wait()

    edit = asyncio.create_task(
        store.update(owner, schedule.id, ScheduleUpdate(target="127.0.0.2"), due, check=slow_check)
    )
    await asyncio.wait_for(entered.wait(), 10)
    fired = await asyncio.wait_for(store.fire_due(due, ScheduleCheck(settings)), 10)
    assert [run.scheduled_for for run in fired] == [due]
    release.set()
    edited = await asyncio.wait_for(edit, 10)
    assert edited is not None
    assert edited.target == "127.0.0.2"
    assert edited.next_run_at == BASE + timedelta(days=1, hours=3)
    assert checks == ["127.0.0.2", "127.0.0.2"]  # merged and checked again after the tick
    await pool.execute("DELETE FROM scan_publish_outbox WHERE scan_id = $1", fired[0].scan_id)
