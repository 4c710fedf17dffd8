"""A stopping worker counts the deliveries it requeues as released, merges included."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import pytest
from celery.worker import state

from shared.protocol import MERGE_TASK, SCAN_TASK, SHARD_TASK
from worker_service.shutdown import running_deliveries


@dataclass
class FakeRequest:
    name: str
    id: str
    args: tuple[Any, ...]


def test_scans_shards_and_merges_are_all_released(monkeypatch: pytest.MonkeyPatch) -> None:
    scan_task, scan_id = uuid4(), uuid4()
    payload = {"scan_id": str(scan_id)}
    requests = [
        FakeRequest(SCAN_TASK, str(scan_task), (payload,)),
        FakeRequest(SHARD_TASK, "shard-task", (payload, str(scan_task), 2)),
        FakeRequest(MERGE_TASK, "merge-task", (payload, str(scan_task))),
    ]
    monkeypatch.setattr(state, "active_requests", requests)
    assert sorted(running_deliveries(), key=str) == sorted(
        [(SCAN_TASK, scan_task), (SHARD_TASK, (scan_id, 2)), (MERGE_TASK, scan_id)], key=str
    )
