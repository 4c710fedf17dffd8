"""One delivery of a scan on a worker process: re-check the target, scan, identify, assemble.

:func:`deliver_scan` decides what the delivery is (already ended, poison, cancelled, sharded,
to be scanned) and returns its typed outcome; ``worker_service.lifecycle.finish`` records it.
:func:`probe` is the one call into the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Literal, Protocol

import redis

from shared.errors import PermanentError
from shared.policy import TargetPolicy
from shared.ports import format_port_spec, order_by_tier, parse_port_spec
from shared.protocol import HARD_LIMIT_MARGIN, MAX_DELIVERIES, time_limits
from shared.resolve import resolve_target
from shared.retry import TRANSIENT_ERRORS, retry
from shared.schemas import PortResult, ScanConfig, ScanProgress, ScanResult, ScanTaskPayload
from shared.settings import Settings
from shared.store import ScanRow, ScanStore
from shared.targets import parse_target
from worker_service.fingerprint import ServiceInfo, identify, registered_name
from worker_service.lifecycle import (
    MAX_RETRIES,
    Cancelled,
    Completed,
    Delivery,
    Failed,
    Outcome,
    Requeue,
    RetryLater,
    Sharded,
    Skipped,
    retry_budget,
    run_watched,
)
from worker_service.reporting import EventLog, ProgressReporter
from worker_service.scanner import (
    PortOutcome,
    ProgressCallback,
    ScanProgressEvent,
    scan_blocking,
    scan_host,
)

log = logging.getLogger(__name__)

IDENTIFY_CONCURRENCY = 64
IDENTIFY_MIN_SECONDS = 1.0
IDENTIFY_MAX_SECONDS = 3.0
INLINE_MAX_PORTS = 16
INLINE_MAX_SECONDS = 1.0
"""A one-address scan of at most 16 ports that cannot take longer than 1 s sweeps on the loop's
own thread: the executor round trip would cost a 1-port scan more than the sweep does. The loop
has nothing else to serve meanwhile but the cancel check, which then waits at most that long."""


class Runtime(Protocol):
    """What a delivery needs of its process (``worker_service.runtime.WorkerRuntime``)."""

    settings: Settings
    policy: TargetPolicy

    async def store(self) -> ScanStore: ...

    def redis(self) -> redis.Redis: ...


Shard = tuple[list[str], list[int]]
"""The addresses and ports one shard probes (every port at every address)."""


def plan_shards(
    addresses: list[str], ports: list[int], min_probes: int, max_shards: int
) -> list[Shard] | None:
    """Split a scan into shards of at least ``min_probes`` probes, or None to run it whole.

    Many addresses are split by address. Otherwise ports are dealt round-robin in tier order,
    so every shard starts with its share of the critical ports and tiers still come first.
    """
    probes = len(addresses) * len(ports)
    count = min(max_shards, probes // min_probes)
    if count < 2:
        return None
    if len(addresses) >= count:
        return [(addresses[i::count], ports) for i in range(count)]
    ordered = [port for _, tier in order_by_tier(ports) for port in tier]
    return [(addresses, sorted(ordered[i::count])) for i in range(count)]


async def identify_services(
    address: str, ports: list[int], config: ScanConfig
) -> dict[int, ServiceInfo]:
    """Service identification on open ports only, after discovery, bounded in time."""
    timeout = max(IDENTIFY_MIN_SECONDS, min(IDENTIFY_MAX_SECONDS, 2 * config.timeout))
    gate = asyncio.Semaphore(IDENTIFY_CONCURRENCY)

    async def one(port: int) -> ServiceInfo:
        async with gate:
            return await identify(address, port, timeout=timeout)

    infos = await asyncio.gather(*(one(port) for port in ports))
    return dict(zip(ports, infos, strict=True))


def port_result(address: str, port: int, reason: str, info: ServiceInfo | None) -> PortResult:
    return PortResult(
        port=port,
        state="open",
        reason=reason,
        address=address,
        service=info.service if info else registered_name(port),
        banner=info.banner if info else None,
        product=info.product if info else None,
        version=info.version if info else None,
    )


class HostProgress(Protocol):
    """Progress of a sweep over several addresses, one after another."""

    def start_host(self, address: str) -> None: ...

    def finish_host(self, ports_scanned: int) -> None: ...

    def __call__(self, event: ScanProgressEvent) -> None: ...


async def probe(
    addresses: list[str],
    ports: list[int],
    config: ScanConfig,
    progress: HostProgress,
    *,
    processes: int | None = None,
) -> list[tuple[str, list[PortOutcome]]]:
    """The one call into the engine: every port at every address, one address after another."""
    swept: list[tuple[str, list[PortOutcome]]] = []
    rounds = -(-len(ports) // max(1, min(config.max_concurrent, len(ports))))
    inline = (
        len(addresses) == 1
        and len(ports) <= INLINE_MAX_PORTS
        and rounds * config.timeout <= INLINE_MAX_SECONDS
    )
    for address in addresses:
        progress.start_host(address)
        if inline:
            outcomes = scan_blocking(
                address,
                ports,
                timeout=config.timeout,
                concurrency=config.max_concurrent,
                on_progress=_logging_errors(progress),
            )
        else:
            outcomes = await scan_host(
                address,
                ports,
                timeout=config.timeout,
                concurrency=config.max_concurrent,
                on_progress=progress,
                shard_processes=processes,
            )
        progress.finish_host(len(outcomes))
        swept.append((address, outcomes))
    return swept


def _logging_errors(progress: HostProgress) -> ProgressCallback:
    # On the executor path the loop runs the callback and only logs its errors; a progress
    # write that fails must not fail the scan here either.
    def report(event: ScanProgressEvent) -> None:
        try:
            progress(event)
        except Exception:
            log.exception("progress not reported")

    return report


async def deliver_scan(
    runtime: Runtime,
    delivery: Delivery,
    job: ScanTaskPayload,
    events: EventLog,
    update_state: Callable[[ScanProgress], None],
) -> tuple[Outcome, ScanRow | None]:
    """What this delivery of ``job`` comes to, and the scan's row when it could be read."""
    settings = runtime.settings
    deadline = delivery.work_deadline.sooner(settings.db_retry_seconds)
    try:
        store = await retry(runtime.store, deadline, what=f"scan {job.scan_id}")
        reap = delivery.reap_seconds(settings.db_retry_seconds)
        row = await retry(lambda: store.mark_running(job.scan_id, reap), deadline)
    except TRANSIENT_ERRORS as exc:
        reason = f"database unavailable before the scan could start: {exc!r}"
        if delivery.retries < MAX_RETRIES:
            return RetryLater(reason), None
        return Requeue(reason), None  # nothing recorded: the message must not be dropped
    if row is None:
        return Failed(f"scan {job.scan_id} was never accepted by the gateway"), None
    if row.state == "running" and row.lost_deliveries >= MAX_DELIVERIES:
        reason = (
            f"delivered {row.lost_deliveries} times without finishing (each time its worker"
            " was lost); moved to the dead-letter queue"
        )
        return Failed(reason, dead_letter=True), row
    if row.state == "completed" and row.result is not None:
        return Completed(row.result), row  # a redelivery of a scan that already finished
    if row.state != "running":
        return Skipped(row.state), row
    if row.cancel_requested:
        # Cancelled while it was running nowhere: its worker was lost, or it waited out a
        # retry's countdown. Nothing is probed now.
        return Cancelled(not_started(job)), row
    if row.api_key_id is not None:
        events.hold_slot(row.api_key_id, reap)
    if row.shards_total is not None:  # redelivered after its shards were recorded
        addresses = list(row.addresses)
        return await _shard(store, delivery, job, addresses, [], settings, row.shards_total), row
    target = parse_target(job.target, max_hosts=settings.max_hosts)
    try:
        # A schedule's own exclusions ride in the payload: deny entries on top of the policy.
        policy = runtime.policy.excluding(job.exclude)
        addresses = await resolve_target(target, policy, timeout=settings.resolve_timeout)
    except PermanentError as exc:
        return Failed(str(exc)), row
    if target.kind == "hostname":
        addresses = addresses[:1]
    ports = parse_port_spec(job.ports)
    plan = plan_shards(addresses, ports, settings.shard_min_ports, settings.max_shards)
    if plan is not None:
        return await _shard(store, delivery, job, addresses, plan, settings), row
    scan = ScanJob(job, addresses, events, update_state)
    try:
        async with asyncio.timeout(delivery.work_deadline.remaining):
            return await scan.run(lambda: store.should_stop(job.scan_id)), row
    except TimeoutError:
        return Failed(f"time limit exceeded ({delivery.soft:g} s)"), row


async def _shard(
    store: ScanStore,
    delivery: Delivery,
    job: ScanTaskPayload,
    addresses: list[str],
    plan: list[Shard],
    settings: Settings,
    shards: int | None = None,
) -> Outcome:
    """Record the shards (a redelivery finds them recorded) and hand those with no outcome yet
    to the task layer to publish. The scan may then be reaped only after every shard and the
    merge had their time, one after another."""
    deadline = delivery.write_deadline(settings.db_retry_seconds)
    specs = [(a, format_port_spec(p)) for a, p in plan]
    try:
        pending = await retry(
            lambda: store.start_shards(
                job.scan_id, addresses, specs, sharded_reap_seconds(job, plan, settings)
            ),
            deadline,
        )
    except TRANSIENT_ERRORS as exc:
        return RetryLater(f"database unavailable while sharding: {exc!r}")
    probes = len(addresses) * len(parse_port_spec(job.ports))
    return Sharded(shards or len(plan), probes, tuple(pending))


def shard_limits(job: ScanTaskPayload, shard: Shard, settings: Settings) -> tuple[int, int]:
    """(hard, soft) seconds of one shard, as for a scan of its size."""
    addresses, ports = shard
    return time_limits(job, len(ports), len(addresses), cap=settings.max_scan_seconds)


def merge_limits(settings: Settings) -> tuple[int, int]:
    """(hard, soft) seconds of a sharded scan's merge (identification of its open ports)."""
    return settings.merge_time_limit + HARD_LIMIT_MARGIN, settings.merge_time_limit


def sharded_reap_seconds(job: ScanTaskPayload, plan: list[Shard], settings: Settings) -> float:
    """Every shard and the merge one after another (one worker process may run them all),
    plus the retry budget."""
    hard = sum(shard_limits(job, shard, settings)[0] for shard in plan)
    return hard + merge_limits(settings)[0] + retry_budget(settings.db_retry_seconds)


def not_started(job: ScanTaskPayload) -> ScanResult:
    now = datetime.now(UTC)
    return ScanResult(
        scan_id=job.scan_id,
        target=job.target,
        ports=job.ports,
        total_ports_scanned=0,
        open_ports=[],
        status="revoked",
        progress=0,
        started_at=now,
        finished_at=now,
        duration_seconds=0.0,
    )


class ScanJob:
    """One scan run whole on this process: sweep every address, identify, assemble."""

    def __init__(
        self,
        job: ScanTaskPayload,
        addresses: list[str],
        events: EventLog,
        update_state: Callable[[ScanProgress], None],
    ) -> None:
        self.job = job
        self.addresses = addresses
        self.ports = parse_port_spec(job.ports)
        self.reporter = ProgressReporter(events, update_state, len(self.ports) * len(addresses))
        self.started = datetime.now(UTC)
        self.clock = time.monotonic()
        self.open: list[PortResult] = []
        self.closed = 0
        self.filtered = 0

    async def run(self, should_stop: Callable[[], Awaitable[bool]]) -> Completed | Cancelled:
        stopped = await run_watched(self._scan(), should_stop, f"scan {self.job.scan_id}")
        if stopped:
            return Cancelled(self._partial())
        return Completed(self._result("completed", self.reporter.total, self.open))

    async def _scan(self) -> None:
        swept = await probe(self.addresses, self.ports, self.job.config, self.reporter)
        for address, outcomes in swept:
            open_ports = [o for o in outcomes if o.state == "open"]
            services = await self._identify(address, [o.port for o in open_ports])
            for outcome in open_ports:
                info = services.get(outcome.port)
                self.open.append(port_result(address, outcome.port, outcome.reason, info))
            self.closed += sum(1 for o in outcomes if o.state == "closed")
            self.filtered += sum(1 for o in outcomes if o.state == "filtered")

    async def _identify(self, address: str, ports: list[int]) -> dict[int, ServiceInfo]:
        if not ports or not self.job.config.service_detection:
            return {}
        self.reporter.announce(f"Identifying services on {len(ports)} open ports", "services")
        return await identify_services(address, ports, self.job.config)

    def _partial(self) -> ScanResult:
        seen = {(p.address, p.port) for p in self.open}
        extra = [
            PortResult(port=port, state="open", address=address, service=registered_name(port))
            for address, port in self.reporter.open_ports
            if (address, port) not in seen
        ]
        return self._result("revoked", self.reporter.base, [*self.open, *extra])

    def _result(
        self, status: Literal["completed", "revoked"], scanned: int, found: list[PortResult]
    ) -> ScanResult:
        return ScanResult(
            scan_id=self.job.scan_id,
            target=self.job.target,
            addresses=self.addresses,
            ports=self.job.ports,
            total_ports_scanned=scanned,
            open_ports=sorted(found, key=lambda p: (p.address or "", p.port)),
            closed_ports=self.closed,
            filtered_ports=self.filtered,
            status=status,
            progress=100 if status == "completed" else self.reporter.last_percent,
            started_at=self.started,
            finished_at=datetime.now(UTC),
            duration_seconds=round(time.monotonic() - self.clock, 6),
        )
