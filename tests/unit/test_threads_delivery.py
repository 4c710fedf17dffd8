"""A threads-pool delivery as ``tasks.delivered`` runs it: abandoned, it is counted released
once and handed back; the watchdog's exit counts only the late delivery as lost."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast
from uuid import UUID, uuid4

import pytest
from celery import Task
from celery.exceptions import Reject

from shared.protocol import MERGE_TASK, SCAN_TASK, SHARD_TASK
from shared.settings import Settings
from tests.support.threads import in_threads, threads_runtime
from worker_service import tasks, watchdog
from worker_service.lifecycle import Requeue
from worker_service.metrics import OUTCOME_ATTRIBUTE
from worker_service.runtime import WorkerRuntime
from worker_service.watchdog import EXIT_HARD_LIMIT, Watchdog

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerRuntime]:
    with threads_runtime(monkeypatch) as created:
        monkeypatch.setattr(tasks, "get_runtime", lambda _settings: created)
        yield created


@pytest.fixture
def released(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """What ``delivered`` counted as released (here, not in PostgreSQL)."""
    seen: list[tuple[str, Any]] = []
    monkeypatch.setattr(
        tasks, "release_deliveries", lambda _settings, deliveries: seen.extend(deliveries)
    )
    return seen


def fake_task(name: str, task_id: str) -> Task[Any, Any]:
    settings = Settings(worker_pool="threads", worker_concurrency=3)
    request = SimpleNamespace(id=task_id, timelimit=None, retries=0)
    app = SimpleNamespace(conf=SimpleNamespace(cybersec_settings=settings))
    return cast(Task[Any, Any], SimpleNamespace(name=name, request=request, app=app))


def slow_write(runtime: WorkerRuntime, written: list[str]) -> None:
    """A Redis write queued on the writer thread that takes a moment."""

    def write() -> None:
        time.sleep(0.05)
        written.append("written")

    assert runtime.writer is not None
    runtime.writer.submit(write)


def test_an_abandoned_delivery_is_released_once_and_handed_back(
    runtime: WorkerRuntime, released: list[tuple[str, Any]]
) -> None:
    task_id = str(uuid4())
    task = fake_task(SCAN_TASK, task_id)
    started = threading.Event()
    written: list[str] = []

    async def scanning() -> None:
        started.set()
        await asyncio.Event().wait()

    def body(task: Task[Any, Any]) -> None:
        slow_write(runtime, written)
        runtime.run(scanning())

    def abandon() -> None:
        assert started.wait(5)
        runtime.abandon(task_id)

    answer, _ = in_threads(lambda: tasks.delivered(body)(task), abandon)
    assert isinstance(answer, Reject)
    assert vars(answer)["requeue"] is True
    assert released == [(SCAN_TASK, UUID(task_id))]
    # Labelled as the requeue it is in the metrics, not as a failure.
    assert isinstance(getattr(task.request, OUTCOME_ATTRIBUTE), Requeue)
    assert written == ["written"]  # its queued Redis writes went out before it answered


@pytest.mark.parametrize(
    ("name", "args", "key"),
    [
        (SHARD_TASK, ({"scan_id": "5" * 32}, "parent", 2), (UUID("5" * 32), 2)),
        (MERGE_TASK, ({"scan_id": "5" * 32}, "parent"), UUID("5" * 32)),
    ],
)
def test_an_abandoned_shard_or_merge_releases_its_own_row(
    runtime: WorkerRuntime,
    released: list[tuple[str, Any]],
    name: str,
    args: tuple[Any, ...],
    key: Any,
) -> None:
    task_id = str(uuid4())
    runtime.abandon(task_id)  # before its thread began: its first run is refused

    def body(task: Task[Any, Any], *args: Any) -> None:
        runtime.run(asyncio.sleep(0))

    with pytest.raises(Reject):
        tasks.delivered(body)(fake_task(name, task_id), *args)
    assert released == [(name, key)]


def test_a_delivery_that_returns_drains_its_writes_first(
    runtime: WorkerRuntime, released: list[tuple[str, Any]]
) -> None:
    written: list[str] = []

    def body(task: Task[Any, Any]) -> str:
        slow_write(runtime, written)
        return runtime.run(asyncio.sleep(0, "done"))

    assert tasks.delivered(body)(fake_task(SCAN_TASK, str(uuid4()))) == "done"
    assert written == ["written"]
    assert released == []


def test_the_hard_limit_exit_releases_every_other_delivery_first() -> None:
    exited: list[int] = []
    released: list[list[Any]] = []
    done = threading.Event()

    def exit(code: int) -> None:
        exited.append(code)
        done.set()

    watched = Watchdog(interval=0.01, exit=exit, release=released.append)
    try:
        with (
            watched.watch("innocent", 60, "innocent"),
            watched.watch("quiet", 60),
            watched.watch("poison", 0.0, "poison"),
        ):
            assert done.wait(5)
    finally:
        watched.close()
    assert exited == [EXIT_HARD_LIMIT]
    assert released == [["innocent"]]


def test_the_hard_limit_exit_does_not_wait_for_a_hanging_release(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(watchdog, "RELEASE_WAIT_SECONDS", 0.05)
    exited = threading.Event()
    hang = threading.Event()
    watched = Watchdog(
        interval=0.01, exit=lambda _code: exited.set(), release=lambda _keys: hang.wait()
    )
    try:
        with watched.watch("innocent", 60, "innocent"), watched.watch("poison", 0.0):
            assert exited.wait(5)
    finally:
        hang.set()
        watched.close()
