"""Identical submissions within the cache TTL answer with the finished scan."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.settings import Settings
from tests.conftest import Process, auth, base_url, start_api, variant, wait_final

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def caching_api(settings: Settings, run_dir: Path, database: str) -> Iterator[str]:
    # Same queue as the run's worker, so that worker runs this gateway's scans.
    cache = variant(
        settings, "cache", run_dir, queue_prefix=settings.queue_prefix, result_cache_ttl=60
    )
    process = start_api(cache, run_dir / "api-cache.log")
    try:
        yield base_url(cache)
    finally:
        process.stop()


def test_identical_scan_is_answered_from_the_cache(
    caching_api: str, api_key: str, other_api_key: str, worker: Process, listeners: list[int]
) -> None:
    body = {
        "target": "127.0.0.1",
        "ports": ",".join(map(str, listeners)),
        "config": {"service_detection": False},
    }
    with httpx.Client(base_url=caching_api, headers=auth(api_key), timeout=10) as client:
        first = client.post("/api/scan", json=body)
        assert first.status_code == 202
        task_id = first.json()["task_id"]
        done = wait_final(client, task_id)
        assert done["state"] == "SUCCESS"

        cached = client.post("/api/scan", json={**body, "priority": "high"})
        assert cached.status_code == 200, cached.text
        answer = cached.json()
        assert answer["cached"] is True
        assert answer["task_id"] == task_id
        assert answer["cached_at"] == done["result"]["finished_at"]
        assert [p["port"] for p in answer["result"]["open_ports"]] == listeners

        forced = client.post("/api/scan", json={**body, "force": True})
        assert forced.status_code == 202
        assert forced.json()["task_id"] != task_id
        other_ports = client.post("/api/scan", json={**body, "ports": str(listeners[0])})
        assert other_ports.status_code == 202
        wait_final(client, forced.json()["task_id"])
        wait_final(client, other_ports.json()["task_id"])

    with httpx.Client(base_url=caching_api, headers=auth(other_api_key), timeout=10) as other:
        # The cache is per key: another key's identical scan runs anew.
        fresh = other.post("/api/scan", json=body)
        assert fresh.status_code == 202
        wait_final(other, fresh.json()["task_id"])
