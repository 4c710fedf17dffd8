"""A scan that outlives its time limit ends as failed with the reason, freeing its worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.settings import Settings
from tests.conftest import auth, base_url, own_stack, wait_final

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def limited_time(settings: Settings, run_dir: Path, database: str) -> Iterator[str]:
    with own_stack(settings, run_dir, "timelimit", workers=1, max_scan_seconds=5) as short:
        yield base_url(short)


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
        final = wait_final(client, stuck)
        assert final["state"] == "FAILURE", final
        assert final["error"] == "time limit exceeded (5 s)"
        # The same (only) worker process runs the next scan.
        assert wait_final(client, after)["state"] == "SUCCESS"
