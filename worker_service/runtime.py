"""One event loop and one asyncpg pool per worker process, made on first use after the fork.

``CYBERSEC_WORKER_POOL=prefork``: a process runs one scan at a time, and the task's own thread
runs the loop (``run_until_complete``).

``threads``: one process runs ``worker_concurrency`` scans at once, one Celery thread each. The
loop runs for ever on a thread of its own and every task thread hands it its coroutines
(``run_coroutine_threadsafe``). Nothing may block that loop, so blocking work runs beside it:
the engine's sweeps and discovery on the loop's default executor, sized for every scan at
once, and Redis writes on one writer thread that keeps their order (see ``EventLog.post``).
A watchdog holds each delivery to its hard limit, which Celery enforces only in prefork.

Each task thread runs its delivery inside :meth:`WorkerRuntime.delivery`, which registers the
coroutines it hands over, so :meth:`WorkerRuntime.abandon` reaches every one of them, one not
started yet included, and the delivery's next ``run`` raises ``Abandoned`` at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import os
import resource
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis

from shared.policy import TargetPolicy
from shared.retry import redis_retry
from shared.settings import Settings
from shared.store import ScanStore, create_pool
from worker_service.reporting import RedisGate
from worker_service.shutdown import release_deliveries
from worker_service.watchdog import Watchdog

T = TypeVar("T")
log = logging.getLogger(__name__)

DRAIN_SECONDS = 10.0
"""Longest a finishing task waits for the Redis writes queued before its end to go out."""
CLOSE_DRAIN_SECONDS = 2.0
"""Longest a closing runtime waits for the Redis writes still queued."""
CLOSE_CANCEL_SECONDS = 2.0
"""Longest a closing runtime waits for the work it cancelled on its loop to unwind."""
LOOP_BEAT_SECONDS = 1.0


class Abandoned(BaseException):
    """The work was cancelled from outside (a soft shutdown's end, a lost broker connection, a
    ``revoke --terminate``), or the runtime is closing: its message goes back to the queue. Not
    an ``Exception``: no handler of the work's own may turn it into a failure."""


@dataclass(eq=False)
class _Delivery:
    """The coroutines one delivery's task thread waits for, and whether it was abandoned."""

    waiting: set[Future[Any]] = field(default_factory=set)
    abandoned: bool = False


def executor_threads(concurrency: int) -> int:
    """Threads of a threads-pool process's default executor: every scan's sweep or discovery
    at once, with room for host-name lookups a timeout gave up on (they hold theirs)."""
    return 2 * concurrency + 4


def lookup_slots(settings: Settings) -> int:
    """Host-name lookups a threads-pool process runs at once: half its scans, so a resolver
    that hangs can hold at most that many of the executor's threads."""
    return max(1, settings.worker_concurrency // 2)


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

    def __init__(
        self,
        settings: Settings,
        *,
        release: Callable[[list[Any]], object] | None = None,
    ) -> None:
        """``release`` (threads mode) counts deliveries, by their :meth:`watch` key, as handed
        back rather than lost; the watchdog calls it, bounded, before it exits the process."""
        self.settings = settings
        self.pid = os.getpid()
        self.threaded = settings.worker_pool == "threads"
        self.loop = asyncio.new_event_loop()
        self.policy = TargetPolicy(settings.target_allow, settings.target_deny)
        self._store: ScanStore | None = None
        self._store_lock = asyncio.Lock()
        self._redis: redis.Redis | None = None
        self._redis_lock = threading.Lock()
        self._lock = threading.Lock()
        """Guards the registry below: a hand-over and an abandon never interleave."""
        self._deliveries: dict[str, _Delivery] = {}
        self._loose: set[Future[Any]] = set()
        """Coroutines handed over outside any delivery (a metric's lookup)."""
        self._shielded: set[Future[Any]] = set()
        self._closing = False
        self._local = threading.local()
        self.redis_gate = RedisGate()
        """Shared by every scan's event log: one Redis failure pauses them all (backoff)."""
        self.lookups = asyncio.Semaphore(lookup_slots(settings)) if self.threaded else None
        """Host-name lookups in flight (threads): each holds an executor thread until the
        resolver answers, so they are bounded below what the sweeps need. A prefork process
        runs one scan: its lookups are not bounded."""
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
            self.watchdog = Watchdog(release=release)
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

    @contextlib.contextmanager
    def delivery(self, task_id: str) -> Iterator[None]:
        """Run the enclosed delivery (on the calling task thread) as ``task_id``: what it
        hands over with :meth:`run` is what ``abandon(task_id)`` cancels. An abandon that came
        first (the request was accepted, its thread not here yet) holds already."""
        if not self.threaded:
            yield
            return
        with self._lock:
            entry = self._deliveries.setdefault(task_id, _Delivery())
        self._local.delivery = entry
        try:
            yield
        finally:
            self._local.delivery = None
            with self._lock:
                if self._deliveries.get(task_id) is entry:
                    del self._deliveries[task_id]

    def run(self, coro: Coroutine[Any, Any, T], *, shield: bool = False) -> T:
        """Run ``coro`` on this process's loop and wait for it.

        Threads mode: raises ``Abandoned`` if :meth:`abandon` cancelled it, or at once if the
        calling delivery was abandoned before or the runtime is closing. ``shield``: an
        abandon does not cancel it once it runs (a delivery's final writes, bounded by their
        own deadline: cut in the middle, a write could land after the message was handed
        back); only closing the runtime does."""
        if not self.threaded:
            return self.loop.run_until_complete(coro)
        entry: _Delivery | None = getattr(self._local, "delivery", None)
        with self._lock:
            if self._closing or (entry is not None and entry.abandoned):
                coro.close()
                raise Abandoned()
            future = asyncio.run_coroutine_threadsafe(coro, self.loop)
            abandonable = self._loose if entry is None else entry.waiting
            waiting = self._shielded if shield else abandonable
            waiting.add(future)
        try:
            return future.result()
        except concurrent.futures.CancelledError:
            raise Abandoned() from None
        finally:
            with self._lock:
                waiting.discard(future)

    def abandon(self, task_id: str | None = None) -> None:
        """Cancel what the delivery ``task_id`` (None: every delivery, and coroutines run
        outside one) waits for, and refuse what it hands over next (threads mode): its message,
        not acked yet, goes back to the queue. A coroutine the loop has not started yet is
        cancelled at its first ``await``; a shielded one runs on."""
        if not self.threaded:
            return
        with self._lock:
            if task_id is None:
                entries = list(self._deliveries.values())
                cancelled = [*self._loose]
            else:
                entries = [self._deliveries.setdefault(task_id, _Delivery())]
                cancelled = []
            for entry in entries:
                entry.abandoned = True
                cancelled.extend(entry.waiting)
        # Outside the lock: a cancelled future's callbacks run here.
        for future in cancelled:
            future.cancel()

    @contextlib.contextmanager
    def watch(self, what: str, hard_seconds: float, key: Any = None) -> Iterator[None]:
        """Threads mode: exit the process if the enclosed delivery outlives its hard limit;
        ``key`` names the delivery to the ``release`` the runtime was made with."""
        if self.watchdog is None:
            yield
            return
        with self.watchdog.watch(what, hard_seconds, key):
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
        with self._lock:
            if self._closing:
                return
            self._closing = True  # threads mode: from now on every run() raises Abandoned
        if self.threaded:
            self.abandon()  # a task thread still waiting must not wait for ever
            self._end_left_work()
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

    def _end_left_work(self) -> None:
        """Cancel what still runs on the loop, a shielded final write included (the process
        is going: its message, not acked, is redelivered), and let it unwind briefly."""

        async def cancel_all() -> None:
            left = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in left:
                task.cancel()
            if left:
                await asyncio.wait(left, timeout=CLOSE_CANCEL_SECONDS)

        try:
            self._call(cancel_all(), timeout=CLOSE_CANCEL_SECONDS + 1)
        except TimeoutError:
            log.warning("the event loop did not answer; its work is left to the process's exit")
        # However the loop fares, no task thread waits any longer.
        with self._lock:
            waiting = [*self._shielded, *self._loose]
            waiting.extend(f for entry in self._deliveries.values() for f in entry.waiting)
        for future in waiting:
            future.cancel()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float = 10) -> T:
        if not self.threaded:
            return self.loop.run_until_complete(coro)
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


_runtime: WorkerRuntime | None = None
_lock = threading.Lock()


def get_runtime(settings: Settings) -> WorkerRuntime:
    """This process's runtime; a forked child never reuses its parent's loop or sockets."""
    global _runtime
    with _lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = WorkerRuntime(
                settings, release=functools.partial(release_deliveries, settings)
            )
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
