"""Micro-batching: concurrent calls made within a short window go to the server as one.

A request path that does one small round trip per call (an INSERT, a Redis script) spends most
of its CPU on the round trip, not the work. ``Batcher`` hands the calls gathered meanwhile to one
``run`` call; each caller gets its own result or exception. A call made while no batch is in
flight goes out at the end of the current loop iteration (no added latency when idle); calls made
while one is in flight go out when it returns, ``window`` seconds after the first of them at the
latest, or at once when ``max_size`` are waiting. No task outlives a batch: a flush runs only
while callers wait for it, and ``close`` waits for the last one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

BatchRun = Callable[[list[T]], Awaitable[Sequence[R | Exception]]]
"""Runs a batch; returns one result (or the exception for that caller) per item, in order."""


class Batcher(Generic[T, R]):
    def __init__(self, run: BatchRun[T, R], *, window: float = 0.001, max_size: int = 64) -> None:
        self._run = run
        self._window = window
        self._max_size = max_size
        self._items: list[T] = []
        self._waiters: list[asyncio.Future[R]] = []
        self._timer: asyncio.Handle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self._closed = False

    async def submit(self, item: T) -> R:
        """Run ``item`` in the next batch; raises what the batch (or this item) raised."""
        if self._closed:
            (outcome,) = await self._run([item])
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[R] = loop.create_future()
        self._items.append(item)
        self._waiters.append(waiter)
        if len(self._items) >= self._max_size:
            self._flush()
        elif self._timer is None:
            if self._flushes:
                self._timer = loop.call_later(self._window, self._flush)
            else:
                self._timer = loop.call_soon(self._flush)
        return await waiter

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._items:
            return
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        task = asyncio.get_running_loop().create_task(self._send(items, waiters))
        self._flushes.add(task)
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        if self._items and not self._flushes and not self._closed:
            self._flush()

    async def _send(self, items: list[T], waiters: list[asyncio.Future[R]]) -> None:
        try:
            outcomes = await self._run(items)
        except asyncio.CancelledError:
            for waiter in waiters:
                waiter.cancel()
            raise
        except Exception as exc:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        for waiter, outcome in zip(waiters, outcomes, strict=True):
            if waiter.done():
                continue  # its caller was cancelled; the item ran all the same
            if isinstance(outcome, Exception):
                waiter.set_exception(outcome)
            else:
                waiter.set_result(outcome)

    async def close(self) -> None:
        """Send what is gathered, wait for every batch in flight; later calls run one by one."""
        self._closed = True
        self._flush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)
