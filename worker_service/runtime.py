"""One event loop and one asyncpg pool per worker process, made on first use after the fork.

``CYBERSEC_WORKER_POOL=prefork``: a process runs one scan at a time, and the task's own thread
runs the loop (``run_until_complete``).

``threads``: one process runs ``worker_concurrency`` scans at once, one Celery thread each. The
loop runs for ever on a thread of its own and every task thread hands it its coroutines
(``run_coroutine_threadsafe``). Nothing may block that loop, so blocking work runs beside it:
the engine's sweeps and discovery on the loop's default executor, sized for every scan at
once, and Redis writes on one writer thread that keeps their order (see ``EventLog.post``).
A watchdog holds each delivery to its hard limit, which Celery enforces only in prefork.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import resource
import threading
import time
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import redis

from shared.policy import TargetPolicy
from shared.retry import redis_retry
from shared.settings import Settings
from shared.store import ScanStore, create_pool
from worker_service.reporting import RedisGate
from worker_service.watchdog import Watchdog

T = TypeVar("T")
log = logging.getLogger(__name__)

DRAIN_SECONDS = 10.0
"""Longest a finishing task waits for the Redis writes queued before its end to go out."""
CLOSE_DRAIN_SECONDS = 2.0
"""Longest a closing runtime waits for the Redis writes still queued."""
LOOP_BEAT_SECONDS = 1.0


class Abandoned(BaseException):
    """The work was cancelled from outside (a soft shutdown's end, a lost broker connection):
    its message goes back to the queue. Not an ``Exception``: no handler of the work's own
    may turn it into a failure."""


def executor_threads(concurrency: int) -> int:
    """Threads of a threads-pool process's default executor: every scan's sweep or discovery
    at once, with room for host-name lookups a timeout gave up on (they hold theirs)."""
    return 2 * concurrency + 4


def lookup_slots(settings: Settings) -> int:
    """Host-name lookups one process runs at once (threads: half its scans, so a resolver
    that hangs can hold at most that many of the executor's threads)."""
    if settings.worker_pool == "threads":
        return max(1, settings.worker_concurrency // 2)
    return 1


def pool_sizes(settings: Settings) -> tuple[int, int]:
    """(store pool, relaxed pool) connections of one worker process."""
    if settings.worker_pool == "threads":
        return settings.worker_concurrency + 1, 1 + settings.worker_concurrency // 8
    return 2, 1


def raise_open_files_limit() -> int:
    """The open-file soft limit raised to the hard one (every scan's connects share this
    process); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("open-file limit left at %d: %r", soft, exc)
            return soft
        return hard
    return soft


class WorkerRuntime:
    """The long-lived loop a process's tasks run on, and the pool that lives on that loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.threaded = settings.worker_pool == "threads"
        self.loop = asyncio.new_event_loop()
        self.policy = TargetPolicy(settings.target_allow, settings.target_deny)
        self._store: ScanStore | None = None
        self._store_lock = asyncio.Lock()
        self._redis: redis.Redis | None = None
        self._redis_lock = threading.Lock()
        self._running: set[asyncio.Task[Any]] = set()
        self.redis_gate = RedisGate()
        """Shared by every scan's event log: one Redis failure pauses them all (backoff)."""
        self.lookups = asyncio.Semaphore(lookup_slots(settings))
        """Host-name lookups in flight: each holds an executor thread until the resolver
        answers, so they are bounded below what the sweeps need."""
        self.beat = time.monotonic()
        """When the loop last ran its beat (threads: every second); its age is the loop's lag."""
        self.executor: ThreadPoolExecutor | None = None
        """The loop's default executor in threads mode (None: asyncio's own)."""
        self.writer: ThreadPoolExecutor | None = None
        """The one thread Redis writes run on in threads mode, in order (None: inline)."""
        self.watchdog: Watchdog | None = None
        self._thread: threading.Thread | None = None
        if self.threaded:
            raise_open_files_limit()
            self.executor = ThreadPoolExecutor(
                executor_threads(settings.worker_concurrency), thread_name_prefix="cybersec-probe"
            )
            self.loop.set_default_executor(self.executor)
            self.writer = ThreadPoolExecutor(1, thread_name_prefix="cybersec-redis")
            self.watchdog = Watchdog()
            self._thread = threading.Thread(target=self._serve, name="cybersec-loop", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._beat)
        self.loop.run_forever()

    def _beat(self) -> None:
        self.beat = time.monotonic()
        self.loop.call_later(LOOP_BEAT_SECONDS, self._beat)

    def redis(self) -> redis.Redis:
        """A Redis client for event streams; short timeouts, so an outage only costs progress."""
        with self._redis_lock:
            if self._redis is None:
                self._redis = redis.Redis.from_url(
                    self.settings.redis_url,
                    socket_timeout=1.0,
                    socket_connect_timeout=1.0,
                    retry=redis_retry(),
                )
            return self._redis

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on this process's loop and wait for it; raises ``Abandoned`` if
        :meth:`abandon` cancelled it (threads mode)."""
        if not self.threaded:
            return self.loop.run_until_complete(coro)
        future = asyncio.run_coroutine_threadsafe(self._tracked(coro), self.loop)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise Abandoned() from None

    async def _tracked(self, coro: Coroutine[Any, Any, T]) -> T:
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            return await coro
        finally:
            self._running.discard(task)

    def abandon(self) -> None:
        """Cancel every coroutine the task threads wait for (threads mode): their messages,
        not acked yet, go back to the queue."""
        if self.threaded and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self._cancel_running)

    def _cancel_running(self) -> None:
        for task in tuple(self._running):
            task.cancel()

    @contextlib.contextmanager
    def watch(self, what: str, hard_seconds: float) -> Iterator[None]:
        """Threads mode: exit the process if the enclosed delivery outlives its hard limit."""
        if self.watchdog is None:
            yield
            return
        with self.watchdog.watch(what, hard_seconds):
            yield

    def drain(self, timeout: float = DRAIN_SECONDS) -> None:
        """Wait (on the calling task thread) until the Redis writes queued so far went out,
        so a task's end is written before Celery acks it; bounded, as Redis may hang."""
        if self.writer is None:
            return
        try:
            self.writer.submit(lambda: None).result(timeout)
        except concurrent.futures.TimeoutError:
            log.warning("Redis writes still queued after %.0f s; the task goes on", timeout)
        except RuntimeError:  # the writer was shut down: nothing more will be written
            pass

    async def store(self) -> ScanStore:
        """The process's store; the pool is opened lazily so a database outage is retryable."""
        async with self._store_lock:
            if self._store is None:
                size, relaxed_size = pool_sizes(self.settings)
                pool = await create_pool(self.settings.database_url, max_size=size)
                try:
                    relaxed = await create_pool(
                        self.settings.database_url, max_size=relaxed_size, wait_for_flush=False
                    )
                except BaseException:
                    await pool.close()
                    raise
                self._store = ScanStore(pool, relaxed=relaxed)
            return self._store

    def close(self) -> None:
        if self.threaded:
            self.abandon()  # a task thread still waiting must not wait for ever
            self.drain(CLOSE_DRAIN_SECONDS)  # before the Redis client they use is closed
            if self.writer is not None:
                self.writer.shutdown(wait=False, cancel_futures=True)
        if self._store is not None:
            for pool in (self._store.relaxed, self._store.pool):
                try:
                    self._call(asyncio.wait_for(pool.close(), timeout=5))
                except (TimeoutError, OSError) as exc:
                    log.warning("closing a database pool failed: %s", exc)
            self._store = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None
        if self._thread is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                log.warning("the event loop did not stop; left to the process's exit")
                return
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        if self.watchdog is not None:
            self.watchdog.close()
        self.loop.close()

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if not self.threaded:
            return self.loop.run_until_complete(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings) -> WorkerRuntime:
    """This process's runtime; a forked child never reuses its parent's loop or sockets."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = WorkerRuntime(settings)
        return _runtime


def current_runtime() -> WorkerRuntime | None:
    """This process's runtime if a task made it, without making one."""
    runtime = _runtime
    return runtime if runtime is not None and runtime.pid == os.getpid() else None


def close_runtime() -> None:
    global _runtime
    with _lock:
        if _runtime is not None and _runtime.pid == os.getpid():
            _runtime.close()
        _runtime = None
