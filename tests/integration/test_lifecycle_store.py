"""The lifecycle's queries on the real PostgreSQL: the shard join and the reaper."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from uuid import UUID, uuid4

import asyncpg

from shared.protocol import MERGE_TASK, SCAN_TASK, SHARD_TASK
from shared.reaper import REAPED, reap
from shared.schemas import ScanConfig
from shared.settings import Settings
from shared.store import ScanStore
from tests.support.lifecycle import scan_result
from worker_service.shutdown import release_deliveries


async def running_scan(store: ScanStore, *, reap_in: float | None = None) -> UUID:
    scan_id = uuid4()
    await store.insert(
        scan_id=scan_id,
        task_id=uuid4(),
        target="127.0.0.1",
        ports="1-100",
        config=ScanConfig(),
        priority="normal",
    )
    await store.mark_running(scan_id, reap_in)
    return scan_id


async def test_exactly_one_shard_sees_the_last_outcome_recorded(store: ScanStore) -> None:
    scan_id = await running_scan(store, reap_in=600)
    plan = [(["127.0.0.1"], f"{i * 10 + 1}-{i * 10 + 10}") for i in range(8)]
    pending = await store.start_shards(scan_id, ["127.0.0.1"], plan, 600)
    assert [s.index for s in pending] == list(range(8))
    assert await store.start_shards(scan_id, ["127.0.0.1"], plan, 600) == pending  # redelivery

    lasts = await asyncio.gather(
        *(store.record_shard(scan_id, i, "completed", {"scanned": 10}) for i in range(8))
    )
    assert sorted(lasts) == [False] * 7 + [True]
    # A repeat of a recorded shard (a duplicate delivery, or a retry whose first commit landed
    # with its reply lost) changes nothing, and is last while the scan waits for its merge.
    assert await store.record_shard(scan_id, 3, "failed", None, "late duplicate")
    shards = await store.shards(scan_id)
    assert {s.outcome for s in shards} == {"completed"}
    assert await store.start_shards(scan_id, ["127.0.0.1"], plan, 600) == []
    row = await store.get(scan_id)
    assert row is not None
    assert (row.shards_total, row.shards_done) == (8, 8)


async def test_the_reaper_fails_only_rows_past_their_deadline(store: ScanStore) -> None:
    stuck = await running_scan(store, reap_in=600)
    alive = await running_scan(store, reap_in=600)
    await store.pool.execute(
        "UPDATE scans SET reap_after = now() - interval '1 second' WHERE id = $1", stuck
    )
    reaped = await reap(store.pool)
    assert stuck in {r.scan_id for r in reaped}
    assert alive not in {r.scan_id for r in reaped}
    row = await store.get(stuck)
    assert row is not None
    assert (row.state, row.error) == ("failed", REAPED)
    assert stuck not in {r.scan_id for r in await reap(store.pool)}  # once


async def test_reapers_running_at_once_skip_each_others_rows(
    store: ScanStore, database: str
) -> None:
    """A row another replica has claimed (locked) is skipped, not waited for nor reaped twice."""
    held = await running_scan(store, reap_in=600)
    free = await running_scan(store, reap_in=600)
    await store.pool.execute(
        "UPDATE scans SET reap_after = now() - interval '1 second' WHERE id = ANY($1)",
        [held, free],
    )
    other: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(database)
    try:
        async with other.transaction():
            await other.execute("SELECT 1 FROM scans WHERE id = $1 FOR UPDATE", held)
            first = {r.scan_id for r in await asyncio.wait_for(reap(store.pool), 10)}
        assert free in first
        assert held not in first
        assert held in {r.scan_id for r in await reap(store.pool)}
    finally:
        await other.close()


async def test_a_shard_recorded_after_the_scan_ended_is_never_last(store: ScanStore) -> None:
    """A scan another shard failed gets no merge: its last shard does not report 'last'."""
    scan_id = await running_scan(store, reap_in=600)
    plan = [(["127.0.0.1"], "1-50"), (["127.0.0.1"], "51-100")]
    await store.start_shards(scan_id, ["127.0.0.1"], plan, 600)
    assert not await store.record_shard(scan_id, 0, "failed", None, "shard 0: boom")
    row = await store.get(scan_id)
    assert row is not None
    await store.fail_by_task(row.task_id, "shard 0: boom")
    assert not await store.record_shard(scan_id, 1, "completed", {"scanned": 50})
    assert not await store.record_shard(scan_id, 1, "completed", {"scanned": 50})  # repeat


async def test_shard_writes_lock_the_scan_before_its_shards(
    store: ScanStore, database: str
) -> None:
    """One lock order (scans, then scan_shards) in start_shards, shard_started and
    record_shard: while the scan row is held, neither waiting call holds a shard row."""
    scan_id = await running_scan(store, reap_in=600)
    plan = [(["127.0.0.1"], "1-50"), (["127.0.0.1"], "51-100")]
    await store.start_shards(scan_id, ["127.0.0.1"], plan, 600)
    other: asyncpg.Connection[asyncpg.Record] = await asyncpg.connect(database)
    try:
        for call in (
            lambda: store.shard_started(scan_id, 0, 600),
            lambda: store.record_shard(scan_id, 0, "completed", {"scanned": 50}),
        ):
            async with other.transaction():
                await other.execute("SELECT 1 FROM scans WHERE id = $1 FOR UPDATE", scan_id)
                async with store.pool.acquire() as probe:
                    pid = await probe.fetchval("SELECT pg_backend_pid()")
                    # The pool's only other connections are idle; find the waiting one.
                    pending = asyncio.ensure_future(call())
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + 10
                    waiter = None
                    while waiter is None and loop.time() < deadline:
                        waiter = await probe.fetchval(
                            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                            " AND wait_event_type = 'Lock' AND pid <> $1 LIMIT 1",
                            pid,
                        )
                        if waiter is None:
                            await asyncio.sleep(0.02)
                    assert waiter is not None, "the call never waited for the scan's lock"
                # The shard rows are free: the waiting call locked nothing of them yet.
                await other.execute(
                    "SELECT 1 FROM scan_shards WHERE scan_id = $1 FOR UPDATE NOWAIT", scan_id
                )
            await asyncio.wait_for(pending, 10)
    finally:
        await other.close()


async def test_complete_reports_whether_this_result_ended_the_scan(store: ScanStore) -> None:
    """True for the write that ended it and for a repeat of that write (its reply lost);
    False for another result after it, and for a scan that had failed: no second end."""
    done = await running_scan(store, reap_in=600)
    first = scan_result(done)
    assert await store.complete(first)
    assert await store.complete(first)  # the retry of a write whose reply was lost
    later = first.model_copy(update={"finished_at": first.finished_at + timedelta(seconds=1)})
    assert not await store.complete(later)
    row = await store.get(done)
    assert row is not None
    assert row.finished_at == first.finished_at  # the first result stays

    failed = await running_scan(store, reap_in=600)
    row = await store.get(failed)
    assert row is not None
    await store.fail_by_task(row.task_id, "shard 0: boom")
    assert not await store.complete(scan_result(failed))
    row = await store.get(failed)
    assert row is not None
    assert (row.state, row.result) == ("failed", None)


async def test_one_merge_message_claims_the_merge(store: ScanStore) -> None:
    scan_id = await running_scan(store, reap_in=600)
    first = await store.merge_started(scan_id, "merge-a", 600)
    assert first is not None
    assert first[1]
    assert first[0].merge_task == "merge-a"
    again = await store.merge_started(scan_id, "merge-a", 600)  # its redelivery, its retry
    assert again is not None
    assert again[1]
    other = await store.merge_started(scan_id, "merge-b", 600)  # a duplicate message
    assert other is not None
    assert not other[1]
    await store.release_merge(scan_id)
    row = await store.get(scan_id)
    assert row is not None
    # Two deliveries of the claiming message, one of them released: none lost; the
    # duplicate message is not counted at all.
    assert (row.merge_attempts, row.merge_released, row.lost_merges) == (2, 1, 0)


async def test_fail_and_revoke_report_whether_they_ended_the_scan(store: ScanStore) -> None:
    failed = await running_scan(store, reap_in=600)
    row = await store.get(failed)
    assert row is not None
    assert await store.fail_by_task(row.task_id, "shard 0: boom")
    assert await store.fail_by_task(row.task_id, "shard 0: boom")  # its retry, reply lost
    assert not await store.fail_by_task(row.task_id, "shard 1: boom too")  # another shard
    assert not await store.revoke(scan_result(failed, "revoked"))

    revoked = await running_scan(store, reap_in=600)
    partial = scan_result(revoked, "revoked")
    assert await store.revoke(partial)
    assert await store.revoke(partial)
    row = await store.get(revoked)
    assert row is not None
    assert not await store.fail_by_task(row.task_id, "late")
    assert row.state == "revoked"


async def test_a_released_delivery_pushes_the_reap_deadline_past_its_queue_wait(
    store: ScanStore,
) -> None:
    scan_id = await running_scan(store, reap_in=60)
    row = await store.get(scan_id)
    assert row is not None
    deadline = await store.pool.fetchval("SELECT reap_after FROM scans WHERE id = $1", scan_id)
    await store.release(row.task_id, 3600)
    await store.release_merge(scan_id, 7200)
    await store.release(row.task_id)  # no seconds: the deadline stays
    later = await store.pool.fetchval("SELECT reap_after FROM scans WHERE id = $1", scan_id)
    assert later - deadline > timedelta(seconds=7000)
    row = await store.get(scan_id)
    assert row is not None
    assert (row.released, row.merge_released) == (2, 1)


async def test_deliveries_handed_back_by_a_stopping_worker_are_not_counted_lost(
    store: ScanStore, settings: Settings
) -> None:
    """What an abandoned threads-pool delivery, or the watchdog for the innocent ones, counts
    before the message goes back: the next delivery of each finds no lost one."""
    scan_id = await running_scan(store, reap_in=600)
    await store.start_shards(scan_id, ["127.0.0.1"], [(["127.0.0.1"], "1-10")], 600)
    assert await store.shard_started(scan_id, 0, 600) is not None
    assert await store.merge_started(scan_id, "merge-task", 600) is not None
    row = await store.get(scan_id)
    assert row is not None
    handed_back = [(SCAN_TASK, row.task_id), (SHARD_TASK, (scan_id, 0)), (MERGE_TASK, scan_id)]
    await asyncio.to_thread(release_deliveries, settings, handed_back)
    # The redeliveries.
    await store.mark_running(scan_id)
    started = await store.shard_started(scan_id, 0, 600)
    merged = await store.merge_started(scan_id, "merge-task", 600)
    assert started is not None
    assert merged is not None
    shard, scan = started[0], merged[0]
    assert (scan.lost_deliveries, shard.lost_deliveries, scan.lost_merges) == (0, 0, 0)
