"""The lifecycle's queries on the real PostgreSQL: the shard join and the reaper."""

from __future__ import annotations

import asyncio
from uuid import UUID, uuid4

import asyncpg

from shared.reaper import REAPED, reap
from shared.schemas import ScanConfig
from shared.store import ScanStore


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
    # A duplicate delivery of a recorded shard changes nothing and is not last again.
    assert not await store.record_shard(scan_id, 3, "failed", None, "late duplicate")
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
