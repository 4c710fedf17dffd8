"""A threads-pool worker process: many task threads, one event loop, nothing blocking it."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from shared.settings import Settings
from worker_service.celery_app import make_celery
from worker_service.pool import ThreadsPool, settle_pool
from worker_service.probe.runner import ProbeLimits, Probing, probe_limits, scan_hosts
from worker_service.runtime import Abandoned, WorkerRuntime, executor_threads
from worker_service.watchdog import EXIT_HARD_LIMIT, Watchdog

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
def runtime() -> Iterator[WorkerRuntime]:
    created = WorkerRuntime(Settings(worker_pool="threads", worker_concurrency=3))
    try:
        yield created
    finally:
        created.close()


def in_threads(*calls: Callable[[], object]) -> list[object]:
    """Run each call on a thread of its own, as Celery's threads pool runs tasks."""
    results: list[object] = [None] * len(calls)

    def one(index: int, call: Callable[[], object]) -> None:
        try:
            results[index] = call()
        except BaseException as exc:  # handed to the test, Abandoned included
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    return results


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
