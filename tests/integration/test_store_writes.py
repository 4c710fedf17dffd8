"""A worker's writes to a scan's row add no index entries (HOT updates), on the real PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast
from uuid import uuid4

from shared.schemas import PortResult, ScanConfig, ScanResult
from shared.settings import Settings
from shared.store import ScanStore, create_pool
from worker_service.runtime import WorkerRuntime


async def test_running_and_completed_writes_are_hot_updates(database: str) -> None:
    """Both writes of a delivery (running, then completed) change no indexed column, and the
    page has room for them: PostgreSQL counts them as HOT updates in this transaction."""
    pool = await create_pool(database, max_size=1)
    conn = await pool.acquire()
    transaction = conn.transaction()
    await transaction.start()
    try:
        # The store's own statements, on one connection, inside one transaction.
        store = ScanStore(cast(Any, conn))
        scan_id = uuid4()
        now = datetime.now(UTC)
        assert await store.insert(
            scan_id=scan_id,
            task_id=uuid4(),
            target="127.0.0.1",
            ports="80",
            config=ScanConfig(),
            priority="normal",
        )
        row = await store.mark_running(scan_id)
        assert row is not None
        assert (row.state, row.attempts) == ("running", 1)
        await store.complete(
            ScanResult(
                scan_id=scan_id,
                target="127.0.0.1",
                ports="80",
                total_ports_scanned=1,
                open_ports=[PortResult(port=80, state="open", service="http")],
                started_at=now,
                finished_at=now,
                duration_seconds=0.001,
            )
        )
        await store.close()
        assert await conn.fetchval("SELECT state FROM scans WHERE id = $1", scan_id) == (
            "completed"
        )
        counts = await conn.fetchrow(
            "SELECT pg_stat_get_xact_tuples_updated('scans'::regclass) AS updated,"
            " pg_stat_get_xact_tuples_hot_updated('scans'::regclass) AS hot"
        )
        assert counts is not None
        assert (counts["updated"], counts["hot"]) == (2, 2)
        # Room for those versions on pages that other rows have filled since.
        options = await conn.fetchval(
            "SELECT reloptions FROM pg_class WHERE oid = 'scans'::regclass"
        )
        assert "fillfactor=80" in options
    finally:
        await transaction.rollback()  # leaves no row behind
        await pool.release(conn)
        await pool.close()


def test_a_worker_marks_scans_running_without_waiting_for_the_disk(
    database: str, settings: Settings
) -> None:
    """A worker's store commits the start of a delivery with ``synchronous_commit = off`` and
    every other write, the result above all, with the server's default (on)."""
    runtime = WorkerRuntime(settings)
    try:
        store = runtime.run(runtime.store())
        assert store.relaxed is not store.pool
        show = "SELECT current_setting('synchronous_commit')"
        assert runtime.run(store.relaxed.fetchval(show)) == "off"
        assert runtime.run(store.pool.fetchval(show)) == "on"
    finally:
        runtime.close()
