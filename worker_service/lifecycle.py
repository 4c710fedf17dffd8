"""A delivery's typed outcome, and the one :func:`finish` that records it.

Every delivery of a scan (or of its merge) ends in exactly one outcome; ``finish`` does the
PostgreSQL write, the Redis final state with the end event and the key's slot release in one
round trip, and the metric. The task layer then only turns the outcome into Celery's answer
(ack, retry, requeue, dead-letter). Nothing on an expected path is an exception.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, TypeVar
from uuid import UUID

from shared.retry import TRANSIENT_ERRORS, Deadline, retry
from shared.schemas import ScanResult
from shared.store import ScanStore, ShardRow

log = logging.getLogger(__name__)

SUCCESS, FAILURE, REVOKED = "SUCCESS", "FAILURE", "REVOKED"
CANCEL_POLL_SECONDS = 0.5
MAX_RETRIES = 3
RETRY_CAP_SECONDS = 30.0
"""Longest countdown of one Celery retry (backoff with full jitter, capped)."""
WRITE_MARGIN_SECONDS = 5.0
"""The last writes of a delivery end this long before its hard limit kills the process."""


def queue_wait_seconds(max_scan_seconds: float, margin: float) -> float:
    """Longest a scan's continuation (a shard, a merge, published at the top priority) waits
    in the queue: until one worker process ends the longest task it may be running."""
    return max_scan_seconds + margin


def retry_budget(db_retry_seconds: float) -> float:
    """Longest a scan may stay 'running' beyond its hard limit while deliveries still retry:
    a database write retried for ``db_retry_seconds`` and every Celery retry's countdown."""
    return db_retry_seconds + MAX_RETRIES * RETRY_CAP_SECONDS


@dataclass(frozen=True, slots=True)
class Delivery:
    """One delivery of a task: its id, Celery retries so far, and time limits (seconds).

    The soft limit is enforced on the event loop (a deadline the work runs under), not by
    Celery's signal, which could land in a loop callback and be swallowed there, or inside a
    write; Celery keeps only the hard limit (see ``worker_service.guard``)."""

    task_id: str
    retries: int
    soft: float
    hard: float
    began: float = field(default_factory=time.monotonic)

    @property
    def work_deadline(self) -> Deadline:
        return Deadline(self.began + self.soft)

    def write_deadline(self, db_retry_seconds: float) -> Deadline:
        """For the final writes: before the hard limit, and no longer than the retry setting
        from now (at least a second, so a write after the soft limit still gets its try)."""
        latest = max(self.began + self.hard - WRITE_MARGIN_SECONDS, time.monotonic() + 1.0)
        return Deadline(latest).sooner(db_retry_seconds)

    def reap_seconds(self, db_retry_seconds: float) -> float:
        return self.hard + retry_budget(db_retry_seconds)


@dataclass(frozen=True, slots=True)
class Completed:
    result: ScanResult
    label: ClassVar[str] = "success"


@dataclass(frozen=True, slots=True)
class Sharded:
    """Handed to shards: the scan ends in its merge (or a shard's failure), not here."""

    shards: int
    probes: int
    """(address, port) pairs of the whole scan."""
    pending: tuple[ShardRow, ...] = ()
    """The recorded shards with no outcome yet: to be published."""
    label: ClassVar[str] = "sharded"


@dataclass(frozen=True, slots=True)
class Skipped:
    """Nothing to run: the scan had ended (cancelled while queued, failed) before."""

    state: str
    label: ClassVar[str] = "revoked"


@dataclass(frozen=True, slots=True)
class Cancelled:
    partial: ScanResult
    label: ClassVar[str] = "revoked"


@dataclass(frozen=True, slots=True)
class Failed:
    reason: str
    dead_letter: bool = False
    """The message goes to the dead-letter queue rather than being acked."""
    label: ClassVar[str] = "failure"


@dataclass(frozen=True, slots=True)
class RetryLater:
    """A dependency is away: the same work is published again after a backoff."""

    reason: str
    label: ClassVar[str] = "retry"


@dataclass(frozen=True, slots=True)
class Requeue:
    """Back to the queue as it is (not a lost worker, not a Celery retry)."""

    reason: str
    label: ClassVar[str] = "retry"


_ENDED = {"completed": SUCCESS, "failed": FAILURE, "revoked": REVOKED}

Outcome = Completed | Sharded | Skipped | Cancelled | Failed | RetryLater | Requeue

Write = Callable[[ScanStore], Awaitable[Any]]


T = TypeVar("T")


def hand_back(delivery: Delivery, reason: str) -> RetryLater | Requeue:
    """A delivery the database kept from recording its work: retried later while it has
    retries left, else requeued (what was not recorded must not be dropped)."""
    return RetryLater(reason) if delivery.retries < MAX_RETRIES else Requeue(reason)


async def start_delivery(
    store: Callable[[], Awaitable[ScanStore]],
    delivery: Delivery,
    db_retry_seconds: float,
    what: str,
    start: Callable[[ScanStore], Awaitable[T]],
) -> tuple[ScanStore, T] | RetryLater | Requeue:
    """Open the process's store and record the start of ``what`` (a scan, a shard, a merge),
    retried until the delivery's start deadline. A database still away then makes the
    delivery a :class:`RetryLater`, or a :class:`Requeue` once its retries are spent: nothing
    was recorded, so the message must not be dropped."""
    deadline = delivery.work_deadline.sooner(db_retry_seconds)
    try:
        opened = await retry(store, deadline, what=what)
        return opened, await retry(lambda: start(opened), deadline)
    except TRANSIENT_ERRORS as exc:
        return hand_back(delivery, f"database unavailable before {what} could start: {exc!r}")


class Ending(Protocol):
    """What :func:`finish` writes through: one scan's task id, store, backend and stream."""

    task_id: UUID
    reap_seconds: float
    """How long from now the reaper must leave a scan whose delivery is retried or requeued:
    the retry's wait in the queue, then its own hard limit and retry budget."""

    async def write(self, call: Write) -> bool:
        """A PostgreSQL write, retried until the delivery's write deadline; False if it never
        landed (the reaper then ends the row)."""

    def storing(self, result: ScanResult) -> None:
        """Make a finished result readable from Redis while PostgreSQL is away."""

    def end(self, state: str, meta: dict[str, Any] | str | None) -> None:
        """Redis: the task's final state (a result dict, a failure reason, or None to leave
        it), the ``end`` event and the key's slot release, in one round trip; never raises."""

    def count(self, outcome: Outcome) -> None:
        """The worker's metric for this delivery."""


async def finish(outcome: Outcome, ending: Ending) -> Outcome:
    """Record ``outcome``; returns what the task must answer, which differs from ``outcome``
    only when a completed result could not be stored (then the work is retried)."""
    match outcome:
        case Completed(result):
            stored = await _store_result(ending, result)
            if stored is None:
                outcome = RetryLater("database unavailable while storing the result")
            elif not stored:
                # The scan had ended otherwise (failed, revoked, another delivery's result):
                # its end event and metric were written then, not again here.
                log.warning("scan %s: result not stored, it had ended", result.scan_id)
                return outcome
            else:
                ending.end(SUCCESS, result.model_dump(mode="json"))
        case Cancelled(partial):
            if not await _ends(ending, lambda store: store.revoke(partial)):
                return outcome
            ending.end(REVOKED, partial.model_dump(mode="json"))
        case Failed(reason):
            task_id = ending.task_id
            if not await _ends(ending, lambda store: store.fail_by_task(task_id, reason)):
                return outcome
            ending.end(FAILURE, reason)
        case Skipped(state):
            ending.end(_ENDED.get(state, REVOKED), None)
        case RetryLater() | Requeue():
            task_id = ending.task_id
            reap = ending.reap_seconds
            await ending.write(lambda store: store.release(task_id, reap))
        case Sharded():
            pass
    ending.count(outcome)
    return outcome


async def _ends(ending: Ending, call: Callable[[ScanStore], Awaitable[bool]]) -> bool:
    """Whether this outcome is to be announced: its write ended the scan, or never landed (the
    database away: Redis still tells clients, the reaper ends the row). False only when the
    scan had ended otherwise (another shard failed it, a result, the reaper): its end event and
    metric were written then."""
    ended: list[bool] = []

    async def write(store: ScanStore) -> None:
        ended.append(await call(store))

    if not await ending.write(write) or not ended or ended[-1]:
        return True
    log.warning("task %s: outcome not announced, the scan had ended", ending.task_id)
    return False


async def _store_result(ending: Ending, result: ScanResult) -> bool | None:
    """Whether the result ended the scan (``ScanStore.complete``); None if never stored."""
    ended: list[bool] = []

    async def complete(store: ScanStore) -> None:
        ended.append(await store.complete(result))

    first = asyncio.ensure_future(ending.write(complete))
    # Readable from Redis at once if the first attempt does not land quickly.
    done, _ = await asyncio.wait({first}, timeout=1.0)
    if not done:
        ending.storing(result)
    if not await first:
        return None
    return ended[-1] if ended else True


async def watch_stop(
    should_stop: Callable[[], Awaitable[bool]], work: asyncio.Future[Any], what: str
) -> bool:
    """Cancel ``work`` once ``should_stop()`` says so (a cancel, or the scan ended meanwhile);
    checked in PostgreSQL every half second, so it reaches work whatever worker runs it."""
    while not work.done():
        await asyncio.sleep(CANCEL_POLL_SECONDS)
        try:
            if await should_stop():
                work.cancel()
                return True
        except TRANSIENT_ERRORS as exc:
            log.warning("%s: cancel check failed: %r", what, exc)
    return False


async def run_watched(
    work: Awaitable[Any], should_stop: Callable[[], Awaitable[bool]], what: str
) -> bool:
    """Run ``work`` under :func:`watch_stop`; True when it was stopped by it."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(watch_stop(should_stop, task, what))
    try:
        await task
    except asyncio.CancelledError:
        if not watcher.done() or not watcher.result():
            raise
        return True
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return False
