"""One threads-pool worker process runs two scans at once: a scan of a live port is not held
behind a scan that only waits on timeouts (issue 15, item 6)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from shared.settings import Settings
from tests.conftest import FINAL_STATES, auth, wait_final
from tests.support.lab import LabSpec
from tests.support.lab_service import lab_service
from tests.support.lifecycle import worker_processes

pytestmark = [pytest.mark.e2e, pytest.mark.netns, pytest.mark.timeout(120)]

LIVE, DROPPED = "198.19.0.10", "198.19.0.20"
SPEC = LabSpec(up={LIVE: [22]})


@pytest.fixture(scope="module")
def threads_api(settings: Settings, run_dir: Path, database: str) -> Iterator[str]:
    # Concurrency 2 on one process: the two scans share its event loop.
    with lab_service(SPEC, settings, run_dir, "threads", workers=2, worker_pool="threads") as url:
        yield url


def row_state(dsn: str, task_id: str) -> str | None:
    async def read() -> str | None:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            state: str | None = await conn.fetchval(
                "SELECT state FROM scans WHERE task_id = $1::uuid", task_id
            )
            return state
        finally:
            await conn.close()

    return asyncio.run(read())


def wait_running(dsn: str, task_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if row_state(dsn, task_id) == "running":
            return
        time.sleep(0.05)
    pytest.fail(f"scan {task_id} did not start within {timeout}s")


def test_a_live_scan_completes_while_a_scan_of_a_dropping_host_waits(
    threads_api: str, api_key: str, database: str, settings: Settings
) -> None:
    with httpx.Client(base_url=threads_api, headers=auth(api_key), timeout=10) as client:
        # Every SYN dropped: two ports, each waiting out 8 s with no retransmission. The live
        # scan below must end, end to end, within those 8 s: a wide margin on a slow runner.
        waiting = client.post(
            "/api/scan",
            json={
                "target": DROPPED,
                "ports": "1-2",
                "config": {
                    "discovery": False,
                    "timeout": 8,
                    "retries": 0,
                    "service_detection": False,
                },
            },
        )
        assert waiting.status_code == 202, waiting.text
        slow = waiting.json()["task_id"]
        wait_running(database, slow)
        live = client.post(
            "/api/scan",
            json={"target": LIVE, "ports": "22", "config": {"service_detection": False}},
        )
        assert live.status_code == 202, live.text
        fast = wait_final(client, live.json()["task_id"], timeout=30)
        # The first scan still waits on its timeouts when the second one has ended.
        still = client.get(f"/api/scan/{slow}").json()
        assert still.get("state") not in FINAL_STATES, still
        assert row_state(database, slow) == "running"
        # ... and both ran in the one process of the worker.
        assert len(worker_processes(f"{settings.queue_prefix}-threads")) == 1
        slow_body = wait_final(client, slow, timeout=60)
    assert fast["state"] == "SUCCESS", fast
    assert [(p["address"], p["port"]) for p in fast["result"]["open_ports"]] == [(LIVE, 22)]
    assert slow_body["state"] == "SUCCESS", slow_body
    result = slow_body["result"]
    assert result["open_ports"] == []
    assert (result["filtered_ports"], result["total_ports_scanned"]) == (2, 2)
