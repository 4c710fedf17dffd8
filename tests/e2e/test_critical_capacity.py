"""Priority means capacity (issue 15, item 7): a critical scan runs on the reserved critical
node while long scans hold every process of the normal node."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench import _messages as msgs
from bench._stack import settings_env
from shared.settings import Settings
from shared.store import ScanStore
from tests.conftest import Process, auth, base_url, own_stack, wait_until

pytestmark = pytest.mark.e2e


def start_critical_worker(settings: Settings, log: Path) -> Process:
    """``python -m worker_service --critical``, once its own heartbeat shows."""
    heartbeat = Path(f"{settings.heartbeat_file}.critical")
    heartbeat.unlink(missing_ok=True)
    args = [
        sys.executable,
        "-m",
        "worker_service",
        "--critical",
        "--without-mingle",
        "--without-gossip",
    ]
    process = Process(args, settings_env(settings), log)
    wait_until(heartbeat.exists, "critical worker heartbeat", process)
    return process


@pytest.fixture(scope="module")
def reserved_stack(settings: Settings, run_dir: Path, database: str) -> Iterator[Settings]:
    """A gateway, a normal node of 2 processes and a critical node of 1, on their own queues."""
    with own_stack(
        settings, run_dir, "reserve", workers=2, critical_concurrency=1, shutdown_timeout=2
    ) as own:
        critical = start_critical_worker(own, run_dir / "worker-reserve-critical.log")
        try:
            yield own
        finally:
            critical.stop()


def state(client: httpx.Client, task_id: str) -> str:
    body: dict[str, Any] = client.get(f"/api/scan/{task_id}").json()
    return str(body["state"])


def wait_state(client: httpx.Client, task_id: str, wanted: set[str], timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while (current := state(client, task_id)) not in wanted:
        assert time.monotonic() < deadline, f"{task_id} still {current}"
        time.sleep(0.05)
    return current


def test_critical_scan_runs_while_long_scans_hold_every_normal_process(
    reserved_stack: Settings, api_key: str, listeners: list[int], silent_port: int
) -> None:
    long_scan = {
        "target": "127.0.0.1",
        "ports": str(silent_port),
        "priority": "low",
        # No retries: the 30 s timeout stays whole; the scans are cancelled below.
        "config": {"timeout": 30.0, "retries": 0, "service_detection": False},
    }
    with httpx.Client(
        base_url=base_url(reserved_stack), headers=auth(api_key), timeout=10
    ) as client:
        long_ids = []
        for _ in range(2):
            answer = client.post("/api/scan", json=long_scan)
            assert answer.status_code == 202, answer.text
            long_ids.append(answer.json()["task_id"])
        try:
            # Both normal processes now hold a scan that waits on a silent port.
            for task_id in long_ids:
                wait_state(client, task_id, {"PROGRESS"})
            answer = client.post(
                "/api/scan",
                json={
                    "target": "127.0.0.1",
                    "ports": ",".join(map(str, listeners)),
                    "priority": "critical",
                    "config": {"service_detection": False},
                },
            )
            assert answer.status_code == 202, answer.text
            critical_id = answer.json()["task_id"]
            assert wait_state(client, critical_id, {"SUCCESS", "FAILURE", "REVOKED"}) == "SUCCESS"
            result = client.get(f"/api/scan/{critical_id}/result").json()
            assert sorted(p["port"] for p in result["open_ports"]) == listeners
            # Done while neither long scan has finished: it did not wait for their processes.
            assert [state(client, task_id) for task_id in long_ids] == ["PROGRESS", "PROGRESS"]
        finally:
            for task_id in long_ids:
                client.delete(f"/api/scan/{task_id}")
        for task_id in long_ids:
            assert wait_state(client, task_id, {"REVOKED"}) == "REVOKED"


async def test_a_critical_scan_queued_under_the_old_routing_still_runs(
    reserved_stack: Settings, store: ScanStore, listeners: list[int]
) -> None:
    """Before the critical queue, critical scans went to the scan queue at priority 10; one
    still waiting there after an upgrade runs on the normal node."""
    settings = reserved_stack
    [(scan_id, _task_id)] = await msgs.preload_scans(
        settings.broker_url,
        settings.scan_queue,
        settings.dead_letter_queue,
        store,
        1,
        ",".join(map(str, listeners)),
        "critical",
        detect=False,
    )
    deadline = time.monotonic() + 30
    while (row := await store.get(scan_id)) is None or row.state != "completed":
        assert row is None or row.state in ("queued", "running"), row
        assert time.monotonic() < deadline, row
        await asyncio.sleep(0.05)
    assert row.result is not None
    assert sorted(p.port for p in row.result.open_ports) == listeners
