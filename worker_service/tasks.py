"""The scan task: validate the payload, resolve, scan, report progress, store, return."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
from celery import Celery, Task
from pydantic import ValidationError

from shared.errors import InvalidScan, ResolutionFailed
from shared.ports import parse_port_spec
from shared.protocol import SCAN_TASK
from shared.schemas import PortResult, ScanProgress, ScanResult, ScanTaskPayload
from shared.settings import Settings
from shared.targets import network_hosts, parse_target
from worker_service.runtime import WorkerRuntime, get_runtime
from worker_service.scanner import ScanProgressEvent, scan_host

log = logging.getLogger(__name__)

MAX_RETRIES = 3
PROGRESS_INTERVAL = 0.25
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


class ProgressReporter:
    """Turns engine events into PROGRESS states, a few per second at most."""

    def __init__(self, publish: Callable[[ScanProgress], None], total: int) -> None:
        self.publish = publish
        self.total = total
        self.last_sent = 0.0
        self.last_tier: str | None = None
        self.base = 0

    def __call__(self, event: ScanProgressEvent) -> None:
        now = time.monotonic()
        if event.tier == self.last_tier and now - self.last_sent < PROGRESS_INTERVAL:
            return
        self.last_tier = event.tier
        self.last_sent = now
        done = self.base + event.ports_scanned
        percent = min(99, done * 100 // self.total) if self.total else 0
        self.publish(
            ScanProgress(
                status=f"Scanning {event.tier} priority ports",
                progress=percent,
                tier=event.tier,
                ports_scanned=done,
                total_ports=self.total,
                open_ports=list(event.open_ports),
            )
        )


async def resolve(target: str, max_hosts: int) -> list[str]:
    """The addresses the worker will connect to, resolved here and not trusted from the gateway."""
    parsed = parse_target(target, max_hosts=max_hosts)
    if parsed.kind == "ip":
        return [parsed.value]
    if parsed.kind == "network":
        import ipaddress

        return [str(a) for a in network_hosts(ipaddress.ip_network(parsed.value))]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(parsed.value, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ResolutionFailed(f"{parsed.value} does not resolve: {exc.strerror}") from None
    addresses = sorted({str(info[4][0]) for info in infos}, key=lambda a: (":" in a, a))
    if not addresses:
        raise ResolutionFailed(f"{parsed.value} resolved to no address")
    return addresses[:1]


def service_name(port: int) -> str | None:
    try:
        return socket.getservbyport(port, "tcp")
    except OSError:
        return None


async def run_scan(
    runtime: WorkerRuntime, job: ScanTaskPayload, report: Callable[[ScanProgress], None]
) -> ScanResult:
    store = await runtime.store()
    started = datetime.now(UTC)
    clock = time.monotonic()
    state = await store.mark_running(job.scan_id)
    if state is None:
        raise InvalidScan(f"scan {job.scan_id} was never accepted by the gateway")
    if state == "completed":
        row = await store.get(job.scan_id)
        if row is not None and row.result is not None:
            return row.result  # a redelivery of a scan that already finished
    if state != "running":
        raise InvalidScan(f"scan {job.scan_id} is {state}; not running it")
    ports = parse_port_spec(job.ports)
    addresses = await resolve(job.target, max_hosts=runtime.settings.max_hosts)
    total = len(ports) * len(addresses)
    reporter = ProgressReporter(report, total)
    open_ports: list[PortResult] = []
    closed = filtered = 0
    for address in addresses:
        outcomes = await scan_host(
            address,
            ports,
            timeout=job.config.timeout,
            concurrency=job.config.max_concurrent,
            on_progress=reporter,
        )
        reporter.base += len(outcomes)
        for outcome in outcomes:
            if outcome.state == "open":
                open_ports.append(
                    PortResult(
                        port=outcome.port,
                        state="open",
                        reason=outcome.reason,
                        address=address,
                        service=service_name(outcome.port),
                    )
                )
            elif outcome.state == "closed":
                closed += 1
            else:
                filtered += 1
    result = ScanResult(
        scan_id=job.scan_id,
        target=job.target,
        addresses=addresses,
        ports=job.ports,
        total_ports_scanned=total,
        open_ports=open_ports,
        closed_ports=closed,
        filtered_ports=filtered,
        started_at=started,
        finished_at=datetime.now(UTC),
        duration_seconds=round(time.monotonic() - clock, 6),
    )
    await store.complete(result)
    return result


def register_tasks(app: Celery) -> None:
    settings: Settings = app.conf.cybersec_settings

    @app.task(name=SCAN_TASK, bind=True, max_retries=MAX_RETRIES)
    def scan(self: Task[Any, Any], payload: dict[str, Any]) -> dict[str, Any]:
        try:
            job = ScanTaskPayload.model_validate(payload)
        except ValidationError as exc:
            raise InvalidScan(f"invalid scan payload: {exc.error_count()} errors") from None
        runtime = get_runtime(settings)

        def report(progress: ScanProgress) -> None:
            self.update_state(state="PROGRESS", meta=progress.model_dump(mode="json"))

        try:
            result = runtime.run(run_scan(runtime, job, report))
        except TRANSIENT_ERRORS as exc:
            log.warning("scan %s: transient failure, retrying: %r", job.scan_id, exc)
            raise self.retry(exc=exc, countdown=retry_delay(self.request.retries)) from exc
        except (InvalidScan, ResolutionFailed) as exc:
            runtime.run(_fail(runtime, job, str(exc)))
            raise
        return result.model_dump(mode="json")


async def _fail(runtime: WorkerRuntime, job: ScanTaskPayload, reason: str) -> None:
    store = await runtime.store()
    await store.fail(job.scan_id, reason)
