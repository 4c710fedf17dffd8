"""Batched inserts against the real PostgreSQL: one statement, each caller its own answer."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Sequence
from uuid import UUID, uuid4

import asyncpg
import pytest

from shared.batching import Batcher
from shared.keys import KeyStore
from shared.schemas import ScanConfig
from shared.store import ScanStore


async def new_owner(store: ScanStore) -> UUID:
    keys = KeyStore(store.pool)
    key = await keys.create(f"batch-{secrets.token_hex(4)}")
    owner = await keys.lookup(key)
    assert owner is not None
    return owner


async def insert(
    store: ScanStore, owner: UUID | None, *, key: str | None = None, target: str = "127.0.0.1"
) -> UUID | None:
    """The new scan's id, or None when the insert was skipped (idempotency conflict)."""
    scan_id = uuid4()
    inserted = await store.insert(
        scan_id=scan_id,
        task_id=uuid4(),
        target=target,
        ports="22,80",
        config=ScanConfig(timeout=2.0),
        priority="high",
        owner=owner,
        idempotency_key=key,
        request_hash=b"h" if key else None,
        cache_key=b"c",
    )
    return scan_id if inserted else None


async def test_concurrent_inserts_each_get_their_own_row(store: ScanStore) -> None:
    owner = await new_owner(store)
    targets = [f"127.0.0.{i}" for i in range(1, 101)]
    ids = await asyncio.gather(*(insert(store, owner, target=t) for t in targets))
    assert all(scan_id is not None for scan_id in ids)
    rows = [await store.get(scan_id) for scan_id in ids if scan_id is not None]
    assert [row.target for row in rows if row is not None] == targets
    for row in rows:
        assert row is not None
        assert row.api_key_id == owner
        assert row.state == "queued"
        assert row.config == ScanConfig(timeout=2.0)
        assert row.priority == "high"


async def test_idempotency_conflicts_within_and_across_batches(store: ScanStore) -> None:
    owner = await new_owner(store)
    first = await insert(store, owner, key="k-earlier")
    assert first is not None
    rows = await asyncio.gather(
        insert(store, owner, key="k-earlier"),  # conflicts with an earlier scan
        insert(store, owner, key="k-same"),  # these two conflict with each other
        insert(store, owner, key="k-same"),
        insert(store, owner),
    )
    assert rows[0] is None
    assert sorted(row is None for row in rows[1:3]) == [False, True]
    assert rows[3] is not None
    found = await store.by_idempotency_key(owner, "k-same")
    assert found is not None
    assert found[0].id in rows[1:3]
    # Another key may use the same idempotency key.
    assert await insert(store, await new_owner(store), key="k-same") is not None


async def test_a_bad_row_fails_only_its_own_caller(store: ScanStore) -> None:
    owner = await new_owner(store)
    unknown_owner = uuid4()  # no such API key: a foreign-key violation
    outcomes = await asyncio.gather(
        insert(store, owner),
        insert(store, unknown_owner),
        insert(store, owner),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], UUID)
    assert isinstance(outcomes[1], asyncpg.ForeignKeyViolationError)
    assert isinstance(outcomes[2], UUID)
    assert await store.get(outcomes[0]) is not None
    assert await store.get(outcomes[2]) is not None
    with pytest.raises(asyncpg.ForeignKeyViolationError):
        await insert(store, unknown_owner)


async def test_batches_gather_concurrent_calls_and_share_errors() -> None:
    batches: list[list[int]] = []
    fail = False

    async def run(items: list[int]) -> Sequence[int | Exception]:
        batches.append(items)
        await asyncio.sleep(0.01)
        if fail:
            raise ConnectionError("down")
        return [ValueError(item) if item < 0 else item * 2 for item in items]

    batcher: Batcher[int, int] = Batcher(run, window=0.001, max_size=4)
    assert await batcher.submit(1) == 2
    assert batches == [[1]]
    outcomes = await asyncio.gather(
        *(batcher.submit(i) for i in (2, -3, 4)), return_exceptions=True
    )
    assert outcomes[0] == 4
    assert isinstance(outcomes[1], ValueError)
    assert outcomes[2] == 8
    batches.clear()
    assert await asyncio.gather(*(batcher.submit(i) for i in range(10))) == [
        i * 2 for i in range(10)
    ]
    assert max(len(b) for b in batches) <= 4
    assert len(batches) < 10

    fail = True
    errors = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
    assert all(isinstance(e, ConnectionError) for e in errors)

    fail = False
    pending = [asyncio.ensure_future(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0)
    await batcher.close()
    assert [p.result() for p in pending] == [0, 2, 4]
    assert not batcher._flushes
    batches.clear()
    assert await batcher.submit(5) == 10  # after close: one by one, no task left behind
    assert batches == [[5]]
    assert not batcher._flushes


async def test_store_close_finishes_inserts_in_flight(database: str) -> None:
    from shared.store import create_pool

    store = ScanStore(await create_pool(database, max_size=2))
    try:
        pending = [asyncio.ensure_future(insert(store, None)) for _ in range(5)]
        await asyncio.sleep(0)
        await store.close()
        assert all(p.result() is not None for p in pending)
    finally:
        await store.pool.close()
    with pytest.raises(asyncpg.InterfaceError):
        await insert(store, None)
