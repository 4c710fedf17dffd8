"""A scan that outlives its time limit ends as failed with the reason, freeing its worker."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.settings import Settings
from tests.conftest import auth, base_url, delete_queues, start_api, start_worker, variant

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def limited_time(settings: Settings, run_dir: Path, database: str) -> Iterator[str]:
    short = variant(settings, "timelimit", run_dir, max_scan_seconds=5)
    api = start_api(short, run_dir / "api-timelimit.log")
    worker = start_worker(short, run_dir / "worker-timelimit.log", concurrency=1)
    try:
        yield base_url(short)
    finally:
        worker.stop()
        api.stop()
        asyncio.run(delete_queues(short))


def test_stuck_scan_fails_at_its_soft_limit_and_the_worker_goes_on(
    limited_time: str, api_key: str, silent_port: int, listeners: list[int]
) -> None:
    with httpx.Client(base_url=limited_time, headers=auth(api_key), timeout=10) as client:
        # The silent port alone would hold this scan for 25 s; its soft limit is 5 s.
        stuck = client.post(
            "/api/scan",
            json={"target": "127.0.0.1", "ports": str(silent_port), "config": {"timeout": 25.0}},
        ).json()["task_id"]
        after = client.post(
            "/api/scan",
            json={
                "target": "127.0.0.1",
                "ports": ",".join(map(str, listeners)),
                "config": {"service_detection": False},
            },
        ).json()["task_id"]
        final = wait(client, stuck, 30)
        assert final["state"] == "FAILURE", final
        assert final["error"] == "time limit exceeded (5 s)"
        # The same (only) worker process runs the next scan.
        assert wait(client, after, 30)["state"] == "SUCCESS"


def wait(client: httpx.Client, task_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/api/scan/{task_id}").json()
        if body["state"] in ("SUCCESS", "FAILURE", "REVOKED"):
            return body
        time.sleep(0.1)
    pytest.fail(f"{task_id} did not end")
