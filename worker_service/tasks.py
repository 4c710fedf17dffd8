"""The Celery tasks: a scan as the gateway published it, and the shards of a large one."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar
from uuid import UUID

from celery import Celery, Task, states
from celery.exceptions import Ignore, Reject, SoftTimeLimitExceeded
from celery.signals import task_postrun
from pydantic import ValidationError

from shared.errors import InvalidScan, PermanentError
from shared.ports import parse_port_spec
from shared.protocol import MERGE_TASK, SCAN_TASK, SHARD_TASK, STORING
from shared.schemas import ScanProgress, ScanResult, ScanTaskPayload
from shared.settings import Settings
from shared.store import ScanStore
from shared.targets import MAX_HOSTS_LIMIT, network_hosts, parse_target
from worker_service.backend import ScanResultBackend
from worker_service.guard import GuardedRequest
from worker_service.job import (
    MAX_RETRIES,
    TRANSIENT_ERRORS,
    PoisonMessage,
    ScanCancelled,
    ScanJob,
    ScanSkipped,
    ShardScan,
    retry_delay,
)
from worker_service.metrics import OUTCOME_ATTRIBUTE
from worker_service.runtime import WorkerRuntime, get_runtime
from worker_service.sharding import ShardProgress, dispatch, merge_shards, run_shard

log = logging.getLogger(__name__)
T = TypeVar("T")


def register_tasks(app: Celery) -> None:
    settings: Settings = app.conf.cybersec_settings
    register_shard_tasks(app)

    # resultrepr_maxsize: Celery renders every return value for its log line, whatever the log
    # level: 170 µs for a 1-port result at the default 1024 characters, 90 µs at 200.
    @app.task(
        name=SCAN_TASK,
        bind=True,
        max_retries=MAX_RETRIES,
        Request=GuardedRequest,
        resultrepr_maxsize=200,
    )
    def scan(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
        runtime = get_runtime(settings)
        try:
            job = ScanTaskPayload.model_validate(payload)
        except ValidationError as exc:
            reason = f"invalid scan payload ({exc.error_count()} errors); dead-lettered"
            task_id = UUID(str(self.request.id))
            with contextlib.suppress(*TRANSIENT_ERRORS):
                runtime.run(_with_store(runtime, lambda store: store.fail_by_task(task_id, reason)))
            with contextlib.suppress(Exception):  # Redis away: the dead-letter queue still gets it
                self.backend.mark_as_failure(str(self.request.id), InvalidScan(reason))
            raise Reject(reason, requeue=False) from None

        # Bound now: a progress event of this scan that the loop runs only after it returned
        # (the engine's last one, after a cancel) must not land on the next task's state.
        own_id = str(self.request.id)

        def update_state(progress: ScanProgress) -> None:
            self.update_state(own_id, state="PROGRESS", meta=progress.model_dump(mode="json"))

        def publish_result(result: ScanResult) -> None:
            with contextlib.suppress(Exception):
                # Not SUCCESS: Celery would then ack a redelivered message whose worker died
                # before the database write landed, and the durable record would be lost.
                self.update_state(own_id, state=STORING, meta=result.model_dump(mode="json"))

        run = ScanJob(
            runtime,
            job,
            own_id,
            update_state,
            publish_result,
            retries=self.request.retries or 0,
        )
        try:
            result = runtime.run(run.run())
        except SoftTimeLimitExceeded:
            runtime.cancel_pending()
            limits = self.request.timelimit or (None, None)
            result = _after_soft_limit(runtime, run, limits[1])
        except ShardScan as sharded:
            plan = sharded.plan

            def announce() -> None:
                update_state(
                    ScanProgress(
                        status=f"Scanning in {len(plan)} shards",
                        progress=0,
                        total_ports=sum(len(a) * len(p) for a, p in plan),
                    )
                )

            started = datetime.now(UTC)
            dispatch(app, job, str(self.request.id), sharded.addresses, plan, started, announce)
            setattr(self.request, OUTCOME_ATTRIBUTE, "sharded")
            raise Ignore() from None
        except ScanSkipped:
            run.finish(states.REVOKED)
            raise Ignore() from None
        except ScanCancelled as cancelled:
            partial = cancelled.partial
            runtime.run(run.with_db(lambda store: store.revoke(partial)))
            self.update_state(state=states.REVOKED, meta=partial.model_dump(mode="json"))
            run.finish(states.REVOKED)
            raise Ignore() from None
        except PoisonMessage as exc:
            _end_failed(runtime, run, str(exc))
            with contextlib.suppress(Exception):  # Redis away: the dead-letter queue still gets it
                self.backend.mark_as_failure(str(self.request.id), exc, request=self.request)
            raise Reject(str(exc), requeue=False) from None
        except PermanentError as exc:
            _end_failed(runtime, run, str(exc))
            raise
        except TRANSIENT_ERRORS as exc:
            log.warning("scan %s: transient failure, retrying: %r", job.scan_id, exc)
            if self.request.retries >= MAX_RETRIES:
                _end_failed(runtime, run, f"gave up after {MAX_RETRIES} retries: {exc!r}")
            raise self.retry(exc=exc, countdown=retry_delay(self.request.retries)) from exc
        except Exception as exc:
            # Anything unforeseen (an error the kernel or the database reports, a shard process
            # gone) ends the scan failed with a reason, rather than acked and 'running' forever.
            log.exception("scan %s: unexpected error", job.scan_id)
            _end_failed(runtime, run, UNEXPECTED)
            raise InvalidScan(UNEXPECTED) from exc
        # The end event and the slot release go out with the SUCCESS Celery stores next.
        _backend(self).ride(str(self.request.id), run.final_writes())
        return result.model_dump(mode="json")

    def settle(task_id: str, task: Task[Any, Any], state: str | None = None, **_: Any) -> None:
        """After the task's own run, whatever was stored: the rider no SUCCESS carried."""
        _backend(task).settle(task_id, state or states.FAILURE)

    task_postrun.connect(settle, sender=scan, weak=False)


UNEXPECTED = "the worker met an unexpected error (its log has the details)"
AFTER_SOFT_LIMIT_SECONDS = 10.0
"""How long a scan past its soft time limit tries to record its end: well within the
``HARD_LIMIT_MARGIN`` before the hard limit kills its process (and Celery acks the message)."""


def _after_soft_limit(runtime: WorkerRuntime, run: ScanJob, soft: float | None) -> ScanResult:
    """Record the end of a scan past its soft limit; returns its result when it had one.

    A scan that had finished and was storing its result (PostgreSQL away) stores it now. One
    that had not fails with ``reason``. When PostgreSQL is still away, the message goes back to
    the queue rather than be acked by the hard limit with the row left 'running'; so does one
    that spent most of its time waiting for PostgreSQL before it could start: its next
    delivery has a time limit of its own (and the poison guard bounds how often that recurs).
    """
    reason = f"time limit exceeded ({soft} s)"
    if run.row is None or (soft and run.result is None and run.waited > soft / 2):
        log.warning("scan %s: %s, waiting for the database: requeued", run.job.scan_id, reason)
        raise Reject(reason, requeue=True)
    finished = run.result

    async def record(write: Callable[[ScanStore], Awaitable[None]]) -> None:
        # Bounded as a whole, a hung connect or query included, not only between attempts.
        async with asyncio.timeout(AFTER_SOFT_LIMIT_SECONDS):
            await run.with_db(write, seconds=AFTER_SOFT_LIMIT_SECONDS)

    try:
        if finished is not None:
            runtime.run(record(lambda store: store.complete(finished)))
            return finished
        runtime.run(record(lambda store: store.fail(run.job.scan_id, reason)))
    except TRANSIENT_ERRORS as exc:
        log.warning(
            "scan %s: %s, database unavailable (%r): requeued", run.job.scan_id, reason, exc
        )
        raise Reject(reason, requeue=True) from None
    run.finish(states.FAILURE)
    raise InvalidScan(reason) from None


def _backend(task: Task[Any, Any]) -> ScanResultBackend:
    backend = task.backend
    assert isinstance(backend, ScanResultBackend), "make_celery configures it"
    return backend


def register_shard_tasks(app: Celery) -> None:
    settings: Settings = app.conf.cybersec_settings

    @app.task(name=SHARD_TASK, bind=True, max_retries=MAX_RETRIES, Request=GuardedRequest)
    def scan_shard(
        self: Task[Any, Any],
        payload: dict[str, Any],
        parent_task_id: str,
        index: int,
        addresses: list[str],
        ports: str,
    ) -> dict[str, Any]:
        """Never raises for the scan's sake: an error is returned for the merge to report."""
        job = ScanTaskPayload.model_validate(payload)
        runtime = get_runtime(settings)
        port_list = parse_port_spec(ports)
        total = len(parse_port_spec(job.ports)) * _address_count(job, addresses)

        def update_parent(progress: ScanProgress) -> None:
            self.update_state(
                task_id=parent_task_id, state="PROGRESS", meta=progress.model_dump(mode="json")
            )

        progress = ShardProgress(runtime, parent_task_id, index, total, update_parent)
        try:
            return runtime.run(run_shard(runtime, job, addresses, port_list, progress))
        except SoftTimeLimitExceeded:
            runtime.cancel_pending()
            return {
                "error": "a shard exceeded its time limit",
                "open": [],
                "closed": 0,
                "filtered": 0,
                "scanned": 0,
            }
        except TRANSIENT_ERRORS as exc:
            if self.request.retries >= MAX_RETRIES:
                return {
                    "error": f"a shard gave up after {MAX_RETRIES} retries: {exc!r}",
                    "open": [],
                    "closed": 0,
                    "filtered": 0,
                    "scanned": 0,
                }
            raise self.retry(exc=exc, countdown=retry_delay(self.request.retries)) from exc
        except Exception:
            log.exception("shard %d of %s: unexpected error", index, parent_task_id)
            return {"error": UNEXPECTED, "open": [], "closed": 0, "filtered": 0, "scanned": 0}

    @app.task(name=MERGE_TASK, bind=True, max_retries=MAX_RETRIES, ignore_result=True)
    def scan_merge(
        self: Task[Any, Any],
        shards: list[dict[str, Any]],
        payload: dict[str, Any],
        parent_task_id: str,
        addresses: list[str],
        started: str,
    ) -> None:
        job = ScanTaskPayload.model_validate(payload)
        runtime = get_runtime(settings)
        run = ScanJob(runtime, job, parent_task_id, lambda _p: None, lambda _r: None)
        with contextlib.suppress(*TRANSIENT_ERRORS):
            run.row = runtime.run(_with_store(runtime, lambda store: store.get(job.scan_id)))
        errors = sorted({shard["error"] for shard in shards if shard.get("error")})
        if errors:
            _merge_failed(self, runtime, run, parent_task_id, "; ".join(errors))
            return
        # A cancel that came after the shards finished still wins: identification, the merge's
        # own probing, is skipped, and one that came during it turns the result revoked.
        cancel = run.row is not None and run.row.cancel_requested
        began = datetime.fromisoformat(started)
        try:
            result = runtime.run(
                merge_shards(job, shards, addresses, began, cancel_requested=cancel)
            )
        except Exception:
            log.exception("merge of %s: unexpected error", parent_task_id)
            _merge_failed(self, runtime, run, parent_task_id, UNEXPECTED)
            return
        if result.status == "completed":
            with contextlib.suppress(*TRANSIENT_ERRORS):
                if runtime.run(
                    _with_store(runtime, lambda store: store.cancel_requested(job.scan_id))
                ):
                    result = result.model_copy(update={"status": "revoked"})
        try:
            if result.status == "revoked":
                runtime.run(run.with_db(lambda store: store.revoke(result)))
            else:
                runtime.run(run.with_db(lambda store: store.complete(result)))
        except TRANSIENT_ERRORS as exc:
            # The shards' outcomes travel in this message: a retry merges them again.
            if self.request.retries >= MAX_RETRIES:
                _merge_failed(
                    self,
                    runtime,
                    run,
                    parent_task_id,
                    f"gave up after {MAX_RETRIES} retries: {exc!r}",
                )
                return
            raise self.retry(exc=exc, countdown=retry_delay(self.request.retries)) from exc
        except Exception:
            log.exception("merge of %s: unexpected error", parent_task_id)
            _merge_failed(self, runtime, run, parent_task_id, UNEXPECTED)
            return
        if result.status == "revoked":
            self.backend.store_result(
                parent_task_id, result.model_dump(mode="json"), states.REVOKED
            )
            run.finish(states.REVOKED)
            setattr(self.request, OUTCOME_ATTRIBUTE, "revoked")
            return
        self.backend.store_result(parent_task_id, result.model_dump(mode="json"), states.SUCCESS)
        run.finish(states.SUCCESS)


def _merge_failed(
    task: Task[Any, Any], runtime: WorkerRuntime, run: ScanJob, parent_task_id: str, reason: str
) -> None:
    """The sharded scan failed: in PostgreSQL, and as the FAILURE of the task clients follow."""
    _end_failed(runtime, run, reason)
    with contextlib.suppress(Exception):  # Redis away: PostgreSQL has the failure
        task.backend.mark_as_failure(parent_task_id, InvalidScan(reason))
    setattr(task.request, OUTCOME_ATTRIBUTE, "failure")


def _address_count(job: ScanTaskPayload, shard_addresses: list[str]) -> int:
    target = parse_target(job.target, max_hosts=MAX_HOSTS_LIMIT)
    if target.kind == "network":
        return len(network_hosts(ipaddress.ip_network(target.value)))
    return len(shard_addresses)


async def _with_store(runtime: WorkerRuntime, call: Callable[[ScanStore], Awaitable[T]]) -> T:
    """One call on this process's store, outside a scan's own retries."""
    return await call(await runtime.store())


def _end_failed(runtime: WorkerRuntime, run: ScanJob, reason: str) -> None:
    """Record a failure where possible; a database still away must not hide the reason."""
    try:
        runtime.run(run.with_db(lambda store: store.fail(run.job.scan_id, reason)))
    except Exception as exc:  # its caller reports the failure; the end event must still go out
        log.error("scan %s failed (%s) but was not recorded: %r", run.job.scan_id, reason, exc)
    run.finish(states.FAILURE)
