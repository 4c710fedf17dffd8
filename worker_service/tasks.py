"""The Celery tasks, thin: decode, run the delivery, ``finish`` its outcome, answer Celery.

A scan, a shard of a large one, and the merge of its shards. What a delivery comes to is
decided in ``job``/``sharding`` as a typed outcome and recorded by ``lifecycle.finish``; here it
only becomes Celery's answer: ack (``Ignore``: every state was already written), retry, requeue
or dead-letter (``Reject``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, TypeVar
from uuid import UUID

from celery import Celery, Task
from celery.exceptions import Ignore, Reject, Retry
from pydantic import ValidationError
from redis.exceptions import RedisError

from shared.ports import parse_port_spec
from shared.protocol import (
    MAX_PRIORITY,
    MERGE_TASK,
    PRIORITIES,
    SCAN_TASK,
    SHARD_TASK,
    STORING,
    queue_for,
)
from shared.retry import TRANSIENT_ERRORS, backoff, retry
from shared.schemas import ScanProgress, ScanResult, ScanTaskPayload
from shared.settings import Settings
from shared.store import ScanRow
from worker_service.backend import ScanResultBackend
from worker_service.guard import GuardedRequest
from worker_service.job import deliver_scan, merge_limits, shard_limits
from worker_service.lifecycle import (
    MAX_RETRIES,
    RETRY_CAP_SECONDS,
    SUCCESS,
    Completed,
    Delivery,
    Failed,
    Outcome,
    Requeue,
    RetryLater,
    Sharded,
    Skipped,
    Write,
    finish,
    queue_wait_seconds,
)
from worker_service.metrics import OUTCOME_ATTRIBUTE
from worker_service.reporting import EventLog
from worker_service.runtime import Abandoned, WorkerRuntime, get_runtime
from worker_service.sharding import DuplicateMerge, Recorded, deliver_merge, deliver_shard
from worker_service.shutdown import delivery_key, release_deliveries

log = logging.getLogger(__name__)


def scan(task: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
    """A scan as the gateway published it."""
    runtime, delivery, events = _start(task, str(task.request.id))
    row = None
    try:
        job = ScanTaskPayload.model_validate(payload)
    except ValidationError as exc:
        reason = f"invalid scan payload ({exc.error_count()} errors); dead-lettered"
        outcome: Outcome = Failed(reason, dead_letter=True)
    else:
        progress = _progress(task, delivery.task_id)
        outcome, row = _run(runtime, deliver_scan(runtime, delivery, job, events, progress))
        if isinstance(outcome, Sharded):
            outcome = _publish_shards(task, job, outcome, progress)
    owner = row.api_key_id if row is not None else None
    ending = TaskEnding(runtime, task, delivery, events, owner)
    return _answer(task, delivery, runtime.run(finish(outcome, ending), shield=True))


def scan_shard(task: Task[Any, Any], payload: dict[str, Any], parent_id: str, index: int) -> None:
    """One shard of a large scan; a failure of its own fails the scan."""
    runtime, delivery, events = _start(task, parent_id)
    job = ScanTaskPayload.model_validate(payload)  # published by a worker, from a valid one
    outcome, row = _run(
        runtime, deliver_shard(runtime, delivery, job, index, events, _progress(task, parent_id))
    )
    if isinstance(outcome, Recorded):
        if outcome.merge:
            # This shard's progress goes out before the merge can end the scan; briefly, as
            # this runs under the hard-limit watch (its full drain comes after the task).
            runtime.drain(SHARD_DRAIN_SECONDS)
            _publish_merge(task, job, parent_id)
        raise Ignore()
    owner = row.api_key_id if row is not None else None
    ending = TaskEnding(runtime, task, delivery, events, owner)
    if isinstance(outcome, RetryLater | Requeue):  # the shard's own delivery, not the scan's
        release = ending.write(lambda store: store.release_shard(job.scan_id, index))
        runtime.run(release, shield=True)
    elif isinstance(outcome, Failed):
        runtime.run(finish(outcome, ending), shield=True)
    _answer(task, delivery, outcome)


def scan_merge(task: Task[Any, Any], payload: dict[str, Any], parent_id: str) -> dict[str, Any]:
    """Join a sharded scan's shards into its one result."""
    runtime, delivery, events = _start(task, parent_id)
    job = ScanTaskPayload.model_validate(payload)
    outcome, row = _run(runtime, deliver_merge(runtime, delivery, job))
    if isinstance(outcome, DuplicateMerge | Skipped):
        # Another merge message runs it, or the scan ended (a shard failed it, a cancel, the
        # reaper) and its end was announced then: nothing to write, announce or count.
        raise Ignore()
    owner = row.api_key_id if row is not None else None
    ending = TaskEnding(runtime, task, delivery, events, owner)
    if isinstance(outcome, RetryLater | Requeue):  # the merge's own delivery, not the scan's
        reap = ending.reap_seconds
        runtime.run(ending.write(lambda store: store.release_merge(job.scan_id, reap)), shield=True)
        ending.count(outcome)
        return _answer(task, delivery, outcome)
    return _answer(task, delivery, runtime.run(finish(outcome, ending), shield=True))


P = ParamSpec("P")
R = TypeVar("R")


def delivered(
    body: Callable[Concatenate[Task[Any, Any], P], R],
) -> Callable[Concatenate[Task[Any, Any], P], R]:
    """A task body as the worker runs it: held to its hard limit (threads pool: the runtime's
    watchdog; prefork: Celery), its Redis writes out before Celery acks it, and its message
    handed back to the queue when the runtime abandoned it (a soft shutdown's end, a lost
    broker connection, a ``revoke --terminate``, the runtime closing) — counted as released
    first, so the poison guard does not take it for a lost worker, and as a requeue in the
    metrics. Its final writes, once begun, are not abandoned (``shield``)."""

    @functools.wraps(body)
    def run(task: Task[Any, Any], /, *args: P.args, **kwargs: P.kwargs) -> R:
        settings: Settings = task.app.conf.cybersec_settings
        runtime = get_runtime(settings)
        _soft, hard = _limits(task, settings)
        task_id = str(task.request.id)
        held = delivery_key(task.name, task_id, args)
        try:
            with runtime.delivery(task_id):
                try:
                    with runtime.watch(f"task {task_id} ({task.name})", hard, held):
                        return body(task, *args, **kwargs)
                finally:
                    runtime.drain()  # bounded on its own: outside the watch
        except Abandoned:
            log.warning("task %s: stopped by the worker; its message goes back", task_id)
            if held is not None:
                release_deliveries(settings, [held])
            requeue = Requeue("stopped by the worker: requeued")
            setattr(task.request, OUTCOME_ATTRIBUTE, requeue)
            raise Reject(requeue.reason, requeue=True) from None

    return run


def register_tasks(app: Celery) -> None:
    # resultrepr_maxsize: Celery renders every return value for its log line, whatever the log
    # level: 170 µs for a 1-port result at the default 1024 characters, 90 µs at 200.
    options: dict[str, Any] = {"bind": True, "Request": GuardedRequest, "resultrepr_maxsize": 200}
    app.task(name=SCAN_TASK, **options)(delivered(scan))  # type: ignore[no-untyped-call]
    app.task(name=SHARD_TASK, ignore_result=True, **options)(delivered(scan_shard))  # type: ignore[no-untyped-call]
    app.task(name=MERGE_TASK, ignore_result=True, **options)(delivered(scan_merge))  # type: ignore[no-untyped-call]


class TaskEnding:
    """Where ``lifecycle.finish`` writes one scan's end: this process's store, the task's
    result backend, the scan's event stream and its key's slot."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        task: Task[Any, Any],
        delivery: Delivery,
        events: EventLog,
        owner: UUID | None,
    ) -> None:
        self.runtime = runtime
        self.task_id = UUID(events.task_id)
        self.request = task.request
        self.backend = _backend(task)
        self.events = events
        self.owner = owner
        self.deadline = delivery.write_deadline(runtime.settings.db_retry_seconds)
        settings = runtime.settings
        wait = queue_wait_seconds(settings.max_scan_seconds, settings.hard_limit_margin)
        self.reap_seconds = wait + delivery.reap_seconds(settings.db_retry_seconds)

    async def write(self, call: Write) -> bool:
        try:
            store = await retry(self.runtime.store, self.deadline)
            await retry(lambda: call(store), self.deadline, what=f"scan of task {self.task_id}")
        except TRANSIENT_ERRORS as exc:
            log.error("task %s: end not recorded in PostgreSQL: %r", self.task_id, exc)
            return False
        return True

    def storing(self, result: ScanResult) -> None:
        # Not SUCCESS: Celery would then ack a redelivered message whose worker died before
        # the database write landed, and the durable record would be lost.
        meta = result.model_dump(mode="json")
        task_id = self.events.task_id
        self.events.post(
            lambda: self.backend.finish(task_id, STORING, meta, lambda _pipe, _state: None)
        )

    def end(self, state: str, meta: dict[str, Any] | str | None) -> None:
        owner = self.owner

        def rider(pipe: Any, _state: str) -> None:
            self.events.add_to(pipe, ("end", {"state": state}), release=owner)

        task_id = self.events.task_id
        if state == SUCCESS and task_id == self.request.id:
            # Marked now, not on the writer thread: Celery stores the returned result as soon
            # as the task returns, even when the drain gave up waiting for this write.
            self.backend.will_return(task_id)
        # Posted after the scan's progress writes: the final state is the last one stored.
        self.events.post(lambda: self.backend.finish(task_id, state, meta, rider))

    def count(self, outcome: Outcome) -> None:
        setattr(self.request, OUTCOME_ATTRIBUTE, outcome)


SHARD_DRAIN_SECONDS = 2.0
"""Longest the last shard waits for its progress writes before it publishes the merge."""
UNEXPECTED = "the worker met an unexpected error (its log has the details)"
D = TypeVar("D")


def _run(
    runtime: WorkerRuntime, delivery: Coroutine[Any, Any, tuple[D, ScanRow | None]]
) -> tuple[D | Failed, ScanRow | None]:
    """A delivery's outcome; anything unforeseen (an error the kernel or the database reports,
    a probe process gone) is a failure with a reason, not a row left 'running'."""
    try:
        return runtime.run(delivery)
    except Exception:
        log.exception("unexpected error")
        return Failed(UNEXPECTED), None


def _limits(task: Task[Any, Any], settings: Settings) -> tuple[float, float]:
    """(soft, hard) seconds of this delivery, from its message."""
    limits = task.request.timelimit or (None, None)
    soft = float(limits[1] or settings.max_scan_seconds)
    return soft, float(limits[0] or soft + settings.hard_limit_margin)


def _start(task: Task[Any, Any], scan_task_id: str) -> tuple[WorkerRuntime, Delivery, EventLog]:
    settings: Settings = task.app.conf.cybersec_settings
    runtime = get_runtime(settings)
    soft, hard = _limits(task, settings)
    delivery = Delivery(str(task.request.id), task.request.retries or 0, soft, hard)
    events = EventLog(
        runtime.redis(),
        settings.redis_prefix,
        scan_task_id,
        settings.result_ttl,
        writer=runtime.writer,
        gate=runtime.redis_gate,
    )
    return runtime, delivery, events


def _progress(task: Task[Any, Any], scan_task_id: str) -> Any:
    # Bound now: a progress event the loop runs only after the task returned (the engine's
    # last one, after a cancel) must not land on the next task's state.
    def update_state(progress: ScanProgress) -> None:
        try:
            meta = progress.model_dump(mode="json")
            task.update_state(scan_task_id, state="PROGRESS", meta=meta)
        except (RedisError, OSError) as exc:  # progress only: the scan goes on without it
            log.warning("task %s: progress not stored: %r", scan_task_id, exc)

    return update_state


def _publish_shards(
    task: Task[Any, Any], job: ScanTaskPayload, sharded: Sharded, progress: Any
) -> Outcome:
    """Publish the recorded shards that have no outcome yet; a redelivery publishes again
    whatever a crash here left unpublished (a duplicate shard is recorded once)."""
    settings: Settings = task.app.conf.cybersec_settings
    progress(
        ScanProgress(
            status=f"Scanning in {sharded.shards} shards",
            progress=0,
            total_ports=sharded.probes,
        )
    )
    payload = job.model_dump(mode="json")
    try:
        for shard in sharded.pending:
            hard, soft = shard_limits(
                job,
                (list(shard.addresses), parse_port_spec(shard.ports)),
                settings,
                sharded.shards,
                shard.index,
            )
            task.app.send_task(
                SHARD_TASK,
                args=(payload, str(task.request.id), shard.index),
                priority=MAX_PRIORITY,  # a continuation: ahead of new scans
                queue=queue_for(
                    PRIORITIES[job.priority], settings.scan_queue, settings.critical_queue
                ),
                time_limit=hard,
                soft_time_limit=soft,
            )
    except Exception as exc:  # the broker: its errors are kombu's, amqp's and OSError
        log.warning("scan %s: shards not all published (%r): requeued", job.scan_id, exc)
        return Requeue(f"shards not published: {exc!r}")
    return sharded


def _publish_merge(task: Task[Any, Any], job: ScanTaskPayload, parent_id: str) -> None:
    settings: Settings = task.app.conf.cybersec_settings
    hard, soft = merge_limits(settings)
    try:
        task.app.send_task(
            MERGE_TASK,
            args=(job.model_dump(mode="json"), parent_id),
            priority=MAX_PRIORITY,  # a continuation: ahead of new scans
            queue=queue_for(PRIORITIES[job.priority], settings.scan_queue, settings.critical_queue),
            time_limit=hard,
            soft_time_limit=soft,
        )
    except Exception as exc:
        # Requeued: its redelivery finds every shard recorded and publishes the merge again.
        log.warning("scan %s: merge not published (%r): requeued", job.scan_id, exc)
        raise Reject(f"merge not published: {exc!r}", requeue=True) from None


def _answer(task: Task[Any, Any], delivery: Delivery, outcome: Any) -> dict[str, Any]:
    """Celery's answer to an outcome ``finish`` has recorded: a completed scan's result
    (stored already: the backend does not store it again), or an exception."""
    if isinstance(outcome, Completed):
        return outcome.result.model_dump(mode="json")
    if isinstance(outcome, Failed) and outcome.dead_letter:
        raise Reject(outcome.reason, requeue=False)
    if isinstance(outcome, RetryLater) and delivery.retries < MAX_RETRIES:
        countdown = backoff(delivery.retries, cap=RETRY_CAP_SECONDS)
        log.warning("task %s: %s; retrying in %.1fs", delivery.task_id, outcome.reason, countdown)
        try:
            # At the top priority: started work goes ahead of new scans (see the reaper).
            raise task.retry(countdown=countdown, priority=MAX_PRIORITY)
        except Retry:
            raise
        except Exception as exc:  # the retry was not published: the message goes back
            raise Reject(f"retry not published: {exc!r}", requeue=True) from None
    if isinstance(outcome, RetryLater | Requeue):
        raise Reject(outcome.reason, requeue=True)
    raise Ignore()


def _backend(task: Task[Any, Any]) -> ScanResultBackend:
    backend = task.backend
    assert isinstance(backend, ScanResultBackend), "make_celery configures it"
    return backend
