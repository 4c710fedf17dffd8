"""A sharded scan's continuations (shards, merge) go ahead of new scans, and the reaper's
deadline allows for their wait in the queue. A fake Celery task records what is published."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast
from uuid import uuid4

import pytest
from celery import Task
from celery.exceptions import Retry

from shared.protocol import MAX_PRIORITY
from shared.schemas import ScanConfig, ScanTaskPayload
from shared.settings import Settings
from shared.store import ShardRow
from worker_service.job import merge_limits, sharded_reap_seconds
from worker_service.lifecycle import Delivery, RetryLater, Sharded, retry_budget
from worker_service.tasks import _answer, _publish_merge, _publish_shards


@dataclass
class FakeApp:
    conf: Any
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def send_task(self, name: str, **options: Any) -> None:
        self.sent.append((name, options))


def fake_task(settings: Settings) -> tuple[Task[Any, Any], FakeApp]:
    app = FakeApp(SimpleNamespace(cybersec_settings=settings))
    task = SimpleNamespace(app=app, request=SimpleNamespace(id=str(uuid4())))
    return cast(Task[Any, Any], task), app


def low_job() -> ScanTaskPayload:
    return ScanTaskPayload(
        scan_id=uuid4(), target="127.0.0.1", ports="1-100", config=ScanConfig(), priority="low"
    )


def test_shards_and_merges_of_a_low_scan_are_published_at_the_top_priority() -> None:
    job = low_job()
    task, app = fake_task(Settings())
    shard = ShardRow(job.scan_id, 0, ("127.0.0.1",), "1-100", 0, 0, None, None, None)
    _publish_shards(task, job, Sharded(1, 100, (shard,)), lambda _progress: None)
    _publish_merge(task, job, str(uuid4()))
    assert [options["priority"] for _name, options in app.sent] == [MAX_PRIORITY] * 2


def test_a_sharded_scans_reap_deadline_allows_a_continuation_its_queue_wait() -> None:
    settings = Settings(max_scan_seconds=600, db_retry_seconds=5)
    reap = sharded_reap_seconds(low_job(), [], settings)
    wait = 600 + settings.hard_limit_margin  # a worker process ending the longest task it may run
    assert reap >= merge_limits(settings)[0] + wait + retry_budget(5)


def test_a_retry_goes_ahead_of_new_scans() -> None:
    retried: list[dict[str, Any]] = []

    def retry(**options: Any) -> Retry:
        retried.append(options)
        return Retry()

    task = cast(Task[Any, Any], SimpleNamespace(retry=retry))
    with pytest.raises(Retry):
        _answer(task, Delivery("t", 0, 10, 40), RetryLater("database away"))
    assert [options["priority"] for options in retried] == [MAX_PRIORITY]
