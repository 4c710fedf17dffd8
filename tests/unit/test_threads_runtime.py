"""A threads-pool worker process: many task threads, one event loop, nothing blocking it."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Coroutine, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from celery.contrib.testing.mocks import TaskMessage

from shared.protocol import SCAN_TASK
from shared.settings import Settings
from tests.support.threads import eventually, in_threads, threads_runtime
from worker_service import runtime as runtime_module
from worker_service.celery_app import make_celery
from worker_service.guard import GuardedRequest
from worker_service.pool import ThreadsPool, settle_pool
from worker_service.probe.runner import ProbeLimits, Probing, probe_limits, scan_hosts
from worker_service.runtime import Abandoned, WorkerRuntime, executor_threads
from worker_service.tasks import register_tasks
from worker_service.watchdog import EXIT_HARD_LIMIT, Watchdog

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch) -> Iterator[WorkerRuntime]:
    with threads_runtime(monkeypatch) as created:
        yield created


def test_task_threads_run_their_coroutines_at_once_on_one_loop(runtime: WorkerRuntime) -> None:
    """Each coroutine waits for an event only the other sets: they finish only if they overlap."""
    first, second = asyncio.Event(), asyncio.Event()
    loops: list[asyncio.AbstractEventLoop] = []

    async def wait_for(mine: asyncio.Event, other: asyncio.Event, name: str) -> str:
        loops.append(asyncio.get_running_loop())
        other.set()
        async with asyncio.timeout(5):
            await mine.wait()
        return name

    results = in_threads(
        lambda: runtime.run(wait_for(first, second, "a")),
        lambda: runtime.run(wait_for(second, first, "b")),
    )
    assert results == ["a", "b"]
    assert loops == [runtime.loop, runtime.loop]


def test_the_default_executor_holds_a_sweep_and_a_discovery_of_every_scan(
    runtime: WorkerRuntime,
) -> None:
    threads = executor_threads(3)
    assert threads >= 2 * 3
    barrier = threading.Barrier(threads, timeout=5)

    async def everyone_at_once() -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(None, barrier.wait) for _ in range(threads)))

    runtime.run(everyone_at_once())  # a BrokenBarrierError if fewer threads ran at once


def test_an_abandoned_delivery_raises_in_its_task_thread(runtime: WorkerRuntime) -> None:
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    def task() -> object:
        return runtime.run(forever())

    def abandon() -> None:
        assert started.wait(5)
        runtime.abandon()

    result, _ = in_threads(task, abandon)
    assert isinstance(result, Abandoned)
    assert runtime.run(asyncio.sleep(0, "still serving")) == "still serving"


class Recorder:
    """Coroutines that say how far they got."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.started = threading.Event()

    async def forever(self, name: str) -> None:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.seen.append(f"{name} cancelled")
            raise

    async def step(self, name: str, seconds: float = 0) -> str:
        self.seen.append(f"{name} began")
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.seen.append(f"{name} cancelled")
            raise
        self.seen.append(f"{name} ended")
        return name


def delivering(runtime: WorkerRuntime, task_id: str, *coros: Coroutine[Any, Any, Any]) -> Any:
    with runtime.delivery(task_id):
        return [runtime.run(coro) for coro in coros]


def test_an_abandon_reaches_a_coroutine_the_busy_loop_has_not_started(
    runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop is busy when the task thread hands its coroutine over: the abandon still
    cancels it, before it could run to its end."""
    handed_over = threading.Event()
    hand_over = asyncio.run_coroutine_threadsafe

    def handing_over(coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop) -> Any:
        future = hand_over(coro, loop)
        handed_over.set()
        return future

    monkeypatch.setattr(asyncio, "run_coroutine_threadsafe", handing_over)
    busy = threading.Event()
    runtime.loop.call_soon_threadsafe(busy.wait, 5)  # a callback that holds the loop
    record = Recorder()

    def abandon() -> None:
        assert handed_over.wait(5)
        runtime.abandon("scan")

    try:
        result, _ = in_threads(lambda: delivering(runtime, "scan", record.step("scan", 2)), abandon)
    finally:
        busy.set()
    assert isinstance(result, Abandoned)
    eventually(lambda: record.seen, "the abandoned coroutine was never cancelled")
    assert "scan ended" not in record.seen
    assert runtime.run(asyncio.sleep(0, "still serving")) == "still serving"


def test_a_delivery_abandoned_between_two_runs_hands_nothing_more_over(
    runtime: WorkerRuntime,
) -> None:
    first_done, abandoned = threading.Event(), threading.Event()
    record = Recorder()

    def task() -> object:
        with runtime.delivery("scan"):
            runtime.run(record.step("first"))
            first_done.set()
            assert abandoned.wait(5)
            return runtime.run(record.step("second"))

    def abandon() -> None:
        assert first_done.wait(5)
        runtime.abandon("scan")
        abandoned.set()

    result, _ = in_threads(task, abandon)
    assert isinstance(result, Abandoned)
    assert record.seen == ["first began", "first ended"]


def test_an_abandon_ends_the_delivery_it_names_only(runtime: WorkerRuntime) -> None:
    """Also one accepted whose thread is not in its delivery yet; the other runs on."""
    runtime.abandon("accepted")
    record = Recorder()
    late = in_threads(lambda: delivering(runtime, "accepted", record.step("late")))
    assert isinstance(late[0], Abandoned)
    assert delivering(runtime, "other", record.step("other")) == ["other"]
    assert record.seen == ["other began", "other ended"]


def test_a_shielded_final_write_runs_on_through_an_abandon(runtime: WorkerRuntime) -> None:
    writing, go_on = threading.Event(), threading.Event()
    record = Recorder()

    async def final_write() -> str:
        writing.set()
        await asyncio.to_thread(go_on.wait, 5)
        return "written"

    def task() -> object:
        with runtime.delivery("scan"):
            record.seen.append(runtime.run(final_write(), shield=True))
            return runtime.run(record.step("after"))

    def abandon() -> None:
        assert writing.wait(5)
        runtime.abandon("scan")
        go_on.set()

    result, _ = in_threads(task, abandon)
    assert isinstance(result, Abandoned)
    assert record.seen == ["written"]


def test_a_closing_runtime_hands_its_task_threads_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting ones (shielded too) get ``Abandoned``, and so does a run after the close:
    never a RuntimeError that the task would record as a failure."""
    record = Recorder()
    with threads_runtime(monkeypatch) as closing:

        def close() -> None:
            assert record.started.wait(5)
            closing.close()

        waiting, _ = in_threads(
            lambda: closing.run(record.forever("final write"), shield=True), close
        )
        assert isinstance(waiting, Abandoned)
        with pytest.raises(Abandoned):
            closing.run(record.step("after the close"))
    assert "after the close began" not in record.seen


def test_a_threads_pool_ends_the_request_celery_names(
    runtime: WorkerRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``revoke --terminate`` of one task ends that delivery alone; ``terminate_job`` without a
    request named (every request has this process's pid) ends them all."""
    monkeypatch.setattr(runtime_module, "_runtime", runtime)
    pool = ThreadsPool(limit=2)  # its own threads, never started here, need no stop
    first, second = Recorder(), Recorder()

    def terminate() -> list[str]:
        assert first.started.wait(5)
        assert second.started.wait(5)
        with pool.only("first"):
            pool.terminate_job(os.getpid())
        eventually(lambda: first.seen, "the named request was not ended")
        seen = [*first.seen, *second.seen]
        pool.terminate_job(os.getpid())
        return seen

    one, two, seen = in_threads(
        lambda: delivering(runtime, "first", first.forever("first")),
        lambda: delivering(runtime, "second", second.forever("second")),
        terminate,
    )
    assert seen == ["first cancelled"]
    assert isinstance(one, Abandoned)
    assert isinstance(two, Abandoned)


def test_a_request_cancelled_by_celery_names_itself_to_the_threads_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lost broker connection or a soft shutdown's end cancels each request on its own."""
    abandoned: list[str | None] = []
    fake = SimpleNamespace(pid=os.getpid(), abandon=abandoned.append)
    monkeypatch.setattr(runtime_module, "_runtime", fake)
    app = make_celery(Settings(worker_pool="threads"))
    register_tasks(app)
    message = TaskMessage(SCAN_TASK, id="one-scan", args=({"scan_id": "x"},))
    request = GuardedRequest(message, app=app, task=app.tasks[SCAN_TASK])
    request.on_accepted(str(os.getpid()), time.monotonic())
    request.cancel(ThreadsPool(limit=2), emit_retry=False)
    assert abandoned == ["one-scan"]


def test_a_delivery_past_its_hard_limit_ends_the_process() -> None:
    exited: list[int] = []
    done = threading.Event()

    def exit(code: int) -> None:
        exited.append(code)
        done.set()

    watchdog = Watchdog(interval=0.01, exit=exit)
    try:
        with watchdog.watch("a quick one", 60):
            pass
        with watchdog.watch("a stuck one", 0.0):
            assert done.wait(5)
    finally:
        watchdog.close()
    assert exited == [EXIT_HARD_LIMIT]


async def test_a_short_scan_leaves_the_shared_loop_free(silent_port: int) -> None:
    """A 1-port scan would sweep on the loop's thread (``runs_inline``); in a threads-pool
    worker it goes to the executor, and the loop serves others while it waits."""
    limits = probe_limits(Settings(worker_pool="threads", worker_concurrency=4))
    assert not limits.inline
    assert limits.max_inflight is not None
    scan = asyncio.ensure_future(
        scan_hosts(
            ["127.0.0.1"], [silent_port], Probing(timeout=1.0, max_concurrent=1), limits=limits
        )
    )
    served = 0
    while not scan.done():
        served += 1
        await asyncio.sleep(0.01)
    found = await scan
    assert served > 1  # the loop ran this coroutine again while the probe waited
    assert [o.state for o in found.outcomes["127.0.0.1"]] == ["filtered"]
    assert ProbeLimits().inline  # prefork keeps sweeping short scans inline


@pytest.mark.parametrize(
    ("asked", "pool", "setting"),
    [("threads", ThreadsPool, "threads"), ("prefork", None, "prefork")],
)
def test_the_settings_follow_the_pool_celery_runs(
    asked: str, pool: type | None, setting: str
) -> None:
    app = make_celery(Settings(worker_concurrency=2))
    worker = SimpleNamespace(app=app, pool_cls=asked, concurrency=16)
    settle_pool(worker)
    if pool is not None:
        assert worker.pool_cls is pool
    settings: Settings = app.conf.cybersec_settings
    assert (settings.worker_pool, settings.worker_concurrency) == (setting, 16)
