"""The scan task: validate, re-check the target, scan, report, store, return."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal

import asyncpg
from celery import Celery, Task, states
from celery.exceptions import Ignore
from pydantic import ValidationError

from shared.errors import InvalidScan, PermanentError
from shared.ports import parse_port_spec
from shared.protocol import SCAN_TASK
from shared.resolve import resolve_target
from shared.schemas import PortResult, ScanProgress, ScanResult, ScanTaskPayload
from shared.settings import Settings
from shared.store import ScanRow, ScanStore
from shared.targets import parse_target
from worker_service.fingerprint import ServiceInfo, identify, registered_name
from worker_service.reporting import EventLog, ProgressReporter
from worker_service.runtime import WorkerRuntime, get_runtime
from worker_service.scanner import scan_host

log = logging.getLogger(__name__)

MAX_RETRIES = 3
IDENTIFY_CONCURRENCY = 64
IDENTIFY_MIN_SECONDS = 1.0
IDENTIFY_MAX_SECONDS = 3.0
CANCEL_POLL_SECONDS = 0.5
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    ConnectionError,
    TimeoutError,
)


def retry_delay(retries: int, *, base: float = 1.0, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2**retries))


class ScanSkipped(Exception):
    """The scan was cancelled or ended before this delivery; nothing to run."""


class ScanCancelled(Exception):
    def __init__(self, partial: ScanResult) -> None:
        super().__init__("cancelled")
        self.partial = partial


class ScanJob:
    """One delivery of a scan task on a worker process."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        job: ScanTaskPayload,
        task_id: str,
        update_state: Callable[[ScanProgress], None],
    ) -> None:
        self.runtime = runtime
        self.settings = runtime.settings
        self.job = job
        self.events = EventLog(
            runtime.redis(), self.settings.redis_prefix, task_id, self.settings.result_ttl
        )
        self.update_state = update_state
        self.row: ScanRow | None = None

    async def run(self) -> ScanResult:
        store = await self.runtime.store()
        row = await store.mark_running(self.job.scan_id)
        if row is None:
            raise InvalidScan(f"scan {self.job.scan_id} was never accepted by the gateway")
        self.row = row
        if row.state == "completed" and row.result is not None:
            return row.result  # a redelivery of a scan that already finished
        if row.state != "running":
            raise ScanSkipped(row.state)
        target = parse_target(self.job.target, max_hosts=self.settings.max_hosts)
        addresses = await resolve_target(
            target, self.runtime.policy, timeout=self.settings.resolve_timeout
        )
        if target.kind == "hostname":
            addresses = addresses[:1]
        scan = asyncio.ensure_future(self._scan(addresses))
        watcher = asyncio.ensure_future(self._watch_cancel(store, scan))
        try:
            result = await scan
        except asyncio.CancelledError:
            if not watcher.done() or not watcher.result():
                raise
            raise ScanCancelled(self._partial) from None
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await store.complete(result)
        return result

    async def _watch_cancel(self, store: ScanStore, scan: asyncio.Future[Any]) -> bool:
        """Cancel the scan when its row asks for it; checked in PostgreSQL, so a cancel
        reaches a scan even when it was requested before this worker started."""
        while not scan.done():
            await asyncio.sleep(CANCEL_POLL_SECONDS)
            try:
                if await store.cancel_requested(self.job.scan_id):
                    scan.cancel()
                    return True
            except TRANSIENT_ERRORS as exc:
                log.warning("scan %s: cancel check failed: %r", self.job.scan_id, exc)
        return False

    async def _scan(self, addresses: list[str]) -> ScanResult:
        ports = parse_port_spec(self.job.ports)
        self.started = datetime.now(UTC)
        self.clock = time.monotonic()
        self.addresses = addresses
        self.reporter = ProgressReporter(
            self.events, self.update_state, len(ports) * len(addresses)
        )
        self.open: list[PortResult] = []
        self.closed = self.filtered = 0
        for address in addresses:
            self.reporter.start_host(address)
            outcomes = await scan_host(
                address,
                ports,
                timeout=self.job.config.timeout,
                concurrency=self.job.config.max_concurrent,
                on_progress=self.reporter,
            )
            self.reporter.finish_host(len(outcomes))
            open_ports = [o for o in outcomes if o.state == "open"]
            services = await self._identify(address, [o.port for o in open_ports])
            for outcome in open_ports:
                info = services.get(outcome.port)
                self.open.append(
                    PortResult(
                        port=outcome.port,
                        state="open",
                        reason=outcome.reason,
                        address=address,
                        service=info.service if info else registered_name(outcome.port),
                        banner=info.banner if info else None,
                        product=info.product if info else None,
                        version=info.version if info else None,
                    )
                )
            for outcome in outcomes:
                if outcome.state == "open":
                    continue
                if outcome.state == "closed":
                    self.closed += 1
                else:
                    self.filtered += 1
        return self._result("completed", self.reporter.total)

    async def _identify(self, address: str, ports: list[int]) -> dict[int, ServiceInfo]:
        """Service identification on open ports only, after discovery, bounded in time."""
        if not ports or not self.job.config.service_detection:
            return {}
        self.reporter.announce(f"Identifying services on {len(ports)} open ports", "services")
        timeout = max(IDENTIFY_MIN_SECONDS, min(IDENTIFY_MAX_SECONDS, 2 * self.job.config.timeout))
        gate = asyncio.Semaphore(IDENTIFY_CONCURRENCY)

        async def one(port: int) -> ServiceInfo:
            async with gate:
                return await identify(address, port, timeout=timeout)

        infos = await asyncio.gather(*(one(port) for port in ports))
        return dict(zip(ports, infos, strict=True))

    @property
    def _partial(self) -> ScanResult:
        seen = {(p.address, p.port) for p in self.open}
        extra = [
            PortResult(port=port, state="open", address=address, service=registered_name(port))
            for address, port in self.reporter.open_ports
            if (address, port) not in seen
        ]
        self.open.extend(extra)
        return self._result("revoked", self.reporter.base)

    def _result(self, status: Literal["completed", "revoked"], scanned: int) -> ScanResult:
        return ScanResult(
            scan_id=self.job.scan_id,
            target=self.job.target,
            addresses=self.addresses,
            ports=self.job.ports,
            total_ports_scanned=scanned,
            open_ports=sorted(self.open, key=lambda p: (p.address or "", p.port)),
            closed_ports=self.closed,
            filtered_ports=self.filtered,
            status=status,
            progress=100 if status == "completed" else self.reporter.last_percent,
            started_at=self.started,
            finished_at=datetime.now(UTC),
            duration_seconds=round(time.monotonic() - self.clock, 6),
        )

    async def fail(self, reason: str) -> None:
        store = await self.runtime.store()
        await store.fail(self.job.scan_id, reason)

    async def revoke(self, partial: ScanResult) -> None:
        store = await self.runtime.store()
        await store.revoke(partial)

    def finish(self, state: str) -> None:
        """Tell stream readers the scan ended and give the key its active slot back."""
        self.events.write(("end", {"state": state}))
        self.events.release(self.row.api_key_id if self.row is not None else None)


def register_tasks(app: Celery) -> None:
    settings: Settings = app.conf.cybersec_settings

    @app.task(name=SCAN_TASK, bind=True, max_retries=MAX_RETRIES)
    def scan(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
        try:
            job = ScanTaskPayload.model_validate(payload)
        except ValidationError as exc:
            raise InvalidScan(f"invalid scan payload: {exc.error_count()} errors") from None
        runtime = get_runtime(settings)

        def update_state(progress: ScanProgress) -> None:
            self.update_state(state="PROGRESS", meta=progress.model_dump(mode="json"))

        run = ScanJob(runtime, job, str(self.request.id), update_state)
        try:
            result = runtime.run(run.run())
        except ScanSkipped:
            run.finish(states.REVOKED)
            raise Ignore() from None
        except ScanCancelled as cancelled:
            runtime.run(run.revoke(cancelled.partial))
            self.update_state(state=states.REVOKED, meta=cancelled.partial.model_dump(mode="json"))
            run.finish(states.REVOKED)
            raise Ignore() from None
        except PermanentError as exc:
            runtime.run(run.fail(str(exc)))
            run.finish(states.FAILURE)
            raise
        except TRANSIENT_ERRORS as exc:
            log.warning("scan %s: transient failure, retrying: %r", job.scan_id, exc)
            raise self.retry(exc=exc, countdown=retry_delay(self.request.retries)) from exc
        run.finish(states.SUCCESS)
        return result.model_dump(mode="json")
