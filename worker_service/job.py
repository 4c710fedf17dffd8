"""One delivery of a scan on a worker process: re-check the target, scan, identify, assemble.

:func:`deliver_scan` decides what the delivery is (already ended, poison, cancelled, sharded,
to be scanned) and returns its typed outcome; ``worker_service.lifecycle.finish`` records it.
:func:`probe` is the one call into the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import redis

from shared.errors import PermanentError
from shared.policy import TargetPolicy
from shared.ports import format_port_spec, parse_port_spec
from shared.protocol import MAX_DELIVERIES, LimitPolicy, time_limits
from shared.resolve import resolve_target
from shared.retry import TRANSIENT_ERRORS, retry
from shared.schemas import (
    MAX_OPEN_PORTS_PER_HOST,
    PortResult,
    ScanConfig,
    ScanProgress,
    ScanResult,
    ScanTaskPayload,
)
from shared.settings import Settings
from shared.store import ScanRow, ScanStore
from shared.targets import parse_target
from worker_service.lifecycle import (
    Cancelled,
    Completed,
    Delivery,
    Failed,
    Outcome,
    Requeue,
    RetryLater,
    Sharded,
    Skipped,
    queue_wait_seconds,
    retry_budget,
    run_watched,
    start_delivery,
)
from worker_service.plan import (
    Shard,
    discover_first,
    discovery_record,
    plan_live,
    plan_shards,
    shard_payload,
)
from worker_service.probe.discovery import HostState
from worker_service.probe.identify import ServiceInfo, identify, registered_name
from worker_service.probe.runner import (
    HostsResult,
    ProbeLimits,
    ScanProgressEvent,
    by_address,
    discover_hosts,
    hosts_results,
    probe_limits,
    scan_hosts,
)
from worker_service.reporting import EventLog, ProgressReporter

log = logging.getLogger(__name__)

IDENTIFY_CONCURRENCY = 64
IDENTIFY_HOSTS = 8
"""Hosts whose services are identified at once, each with up to IDENTIFY_CONCURRENCY."""
IDENTIFY_MIN_SECONDS = 1.0
IDENTIFY_MAX_SECONDS = 3.0
IDENTIFY_BUDGET_SECONDS = 60.0
"""A scan's whole identification: a port not identified by then keeps its registered name."""


class Runtime(Protocol):
    """What a delivery needs of its process (``worker_service.runtime.WorkerRuntime``)."""

    settings: Settings
    policy: TargetPolicy
    lookups: asyncio.Semaphore | None

    async def store(self) -> ScanStore: ...

    def redis(self) -> redis.Redis: ...


def identify_deadline() -> float:
    """When a scan's identification must end (event-loop time), taken once per scan."""
    return asyncio.get_running_loop().time() + IDENTIFY_BUDGET_SECONDS


async def identify_services(
    address: str, ports: list[int], config: ScanConfig, until: float
) -> dict[int, ServiceInfo]:
    """Service identification on open ports only, after discovery, bounded: at most
    ``MAX_OPEN_PORTS_PER_HOST`` ports (a result lists no more), and none after ``until``
    (loop time); the ports left out keep their registered names."""
    timeout = max(IDENTIFY_MIN_SECONDS, min(IDENTIFY_MAX_SECONDS, 2 * config.timeout))
    gate = asyncio.Semaphore(IDENTIFY_CONCURRENCY)
    found: dict[int, ServiceInfo] = {}

    async def one(port: int) -> None:
        async with gate:
            found[port] = await identify(address, port, timeout=timeout)

    try:
        async with asyncio.timeout_at(until):
            await asyncio.gather(*(one(port) for port in ports[:MAX_OPEN_PORTS_PER_HOST]))
    except TimeoutError:
        log.info(
            "%s: identification budget spent, %d of %d ports named", address, len(found), len(ports)
        )
    return found


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
    """Progress of a sweep over several addresses (open ports reported address by address)."""

    def start_host(self, address: str) -> None: ...

    def finish_host(self, ports_scanned: int) -> None: ...

    def __call__(self, event: ScanProgressEvent) -> None: ...


class LiveTotal:
    """A scan's reporter whose total narrows to the live hosts' probes once discovery has
    spoken: a /24 with three hosts up then counts to 3,000, not 254,000."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter

    def start_host(self, address: str) -> None:
        self.reporter.start_host(address)

    def finish_host(self, ports_scanned: int) -> None:
        self.reporter.finish_host(ports_scanned)

    def __call__(self, event: ScanProgressEvent) -> None:
        self.reporter.total = event.total_ports
        self.reporter(event)


async def probe(
    addresses: list[str],
    ports: list[int],
    config: ScanConfig,
    progress: HostProgress,
    *,
    limits: ProbeLimits,
    known: Mapping[str, HostState] | None = None,
) -> HostsResult:
    """The one call into the engine: discovery (unless ``known`` is its answer already), then
    every live host's ports interleaved (``worker_service.probe.runner.scan_hosts``)."""

    def report(event: ScanProgressEvent) -> None:
        # Runs inline for short scans, where no loop logs its errors: a progress write that
        # fails must not fail the scan.
        try:
            for address, one in by_address(event):
                if address is not None:
                    progress.start_host(address)
                progress(one)
        except Exception:
            log.exception("progress not reported")

    found = await scan_hosts(addresses, ports, config, report, limits=limits, known=known)
    progress.finish_host(found.scanned)
    return found


async def deliver_scan(
    runtime: Runtime,
    delivery: Delivery,
    job: ScanTaskPayload,
    events: EventLog,
    update_state: Callable[[ScanProgress], None],
) -> tuple[Outcome, ScanRow | None]:
    """What this delivery of ``job`` comes to, and the scan's row when it could be read."""
    settings = runtime.settings
    reap = delivery.reap_seconds(settings.db_retry_seconds)
    started = await start_delivery(
        runtime.store,
        delivery,
        settings.db_retry_seconds,
        f"scan {job.scan_id}",
        lambda store: store.mark_running(job.scan_id, reap),
    )
    if isinstance(started, RetryLater | Requeue):
        return started, None
    store, row = started
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
        shards = row.shards_total
        return await _shard(store, delivery, job, addresses, [], settings, shards=shards), row
    target = parse_target(job.target, max_hosts=settings.max_hosts)
    try:
        # A schedule's own exclusions ride in the payload: deny entries on top of the policy.
        policy = runtime.policy.excluding(job.exclude)
        addresses = await resolve_target(
            target, policy, timeout=settings.resolve_timeout, lookups=runtime.lookups
        )
    except PermanentError as exc:
        return Failed(str(exc)), row
    if target.kind == "hostname":
        addresses = addresses[:1]
    try:
        async with asyncio.timeout(delivery.work_deadline.remaining):
            scan = _plan_and_scan(store, delivery, job, settings, addresses, events, update_state)
            return await scan, row
    except TimeoutError:
        return Failed(f"time limit exceeded ({delivery.soft:g} s)"), row


async def _plan_and_scan(
    store: ScanStore,
    delivery: Delivery,
    job: ScanTaskPayload,
    settings: Settings,
    addresses: list[str],
    events: EventLog,
    update_state: Callable[[ScanProgress], None],
) -> Outcome:
    """Shard the scan or run it here, planned over the live hosts when it would be split."""
    ports = parse_port_spec(job.ports)
    limits = probe_limits(settings)

    def should_stop() -> Awaitable[bool]:
        return store.should_stop(job.scan_id)

    known: dict[str, HostState] | None = None
    if discover_first(addresses, ports, job.config, settings):
        known = {}

        async def discovery() -> None:
            known.update(await discover_hosts(addresses, job.config, limits=limits))

        if await run_watched(discovery(), should_stop, f"discovery of {job.scan_id}"):
            return Cancelled(not_started(job))
        plan = plan_live(
            addresses, ports, known, settings.shard_min_ports, settings.max_shards, job.config.rate
        )
    else:
        plan = plan_shards(
            addresses, ports, settings.shard_min_ports, settings.max_shards, job.config.rate
        )
    if plan is not None:
        discovery_found = discovery_record(addresses, known) if known is not None else None
        return await _shard(store, delivery, job, addresses, plan, settings, discovery_found)
    scan = ScanJob(job, addresses, events, update_state, limits, known)
    return await scan.run(should_stop)


async def _shard(
    store: ScanStore,
    delivery: Delivery,
    job: ScanTaskPayload,
    addresses: list[str],
    plan: list[Shard],
    settings: Settings,
    discovery: list[dict[str, Any]] | None = None,
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
                job.scan_id,
                addresses,
                specs,
                sharded_reap_seconds(job, plan, settings),
                discovery,
            ),
            deadline,
        )
    except TRANSIENT_ERRORS as exc:
        return RetryLater(f"database unavailable while sharding: {exc!r}")
    probes = sum(len(a) * len(p) for a, p in plan) or len(addresses) * len(
        parse_port_spec(job.ports)
    )
    return Sharded(shards or len(plan), probes, tuple(pending))


def shard_limits(
    job: ScanTaskPayload, shard: Shard, settings: Settings, shards: int, index: int
) -> tuple[int, int]:
    """(hard, soft) seconds of shard ``index`` of ``shards``, as for a scan of its size paced
    to its share of the rate."""
    addresses, ports = shard
    own = shard_payload(job, shards, index)
    return time_limits(own, len(ports), len(addresses), policy=LimitPolicy.of(settings))


def merge_limits(settings: Settings) -> tuple[int, int]:
    """(hard, soft) seconds of a sharded scan's merge (identification of its open ports)."""
    return settings.merge_time_limit + settings.hard_limit_margin, settings.merge_time_limit


def sharded_reap_seconds(job: ScanTaskPayload, plan: list[Shard], settings: Settings) -> float:
    """Every shard and the merge one after another (one worker process may run them all),
    the wait of a continuation in the queue (behind the task a worker process is running),
    plus the retry budget."""
    hard = sum(shard_limits(job, shard, settings, len(plan), i)[0] for i, shard in enumerate(plan))
    wait = queue_wait_seconds(settings.max_scan_seconds, settings.hard_limit_margin)
    return hard + merge_limits(settings)[0] + wait + retry_budget(settings.db_retry_seconds)


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
        limits: ProbeLimits,
        known: Mapping[str, HostState] | None = None,
    ) -> None:
        self.job = job
        self.addresses = addresses
        self.limits = limits
        self.known = known
        self.ports = parse_port_spec(job.ports)
        self.reporter = ProgressReporter(events, update_state, len(self.ports) * len(addresses))
        self.started = datetime.now(UTC)
        self.clock = time.monotonic()
        self.open: list[PortResult] = []
        self.closed = 0
        self.filtered = 0
        self.found: HostsResult | None = None

    async def run(self, should_stop: Callable[[], Awaitable[bool]]) -> Completed | Cancelled:
        stopped = await run_watched(self._scan(), should_stop, f"scan {self.job.scan_id}")
        if stopped:
            return Cancelled(self._partial())
        scanned = self.found.scanned if self.found is not None else self.reporter.total
        return Completed(self._result("completed", scanned, self.open))

    async def _scan(self) -> None:
        progress = LiveTotal(self.reporter)
        found = await probe(
            self.addresses,
            self.ports,
            self.job.config,
            progress,
            limits=self.limits,
            known=self.known,
        )
        self.found = found
        services = await self._identify_hosts(
            {
                host.address: [o.port for o in found.outcomes[host.address] if o.state == "open"]
                for host in found.hosts
                if host.address in found.outcomes and not host.tarpit
            }
        )
        for address, outcomes in found.outcomes.items():
            known = services.get(address, {})
            for outcome in outcomes:
                if outcome.state == "open":
                    info = known.get(outcome.port)
                    self.open.append(port_result(address, outcome.port, outcome.reason, info))
            self.closed += sum(1 for o in outcomes if o.state == "closed")
            self.filtered += sum(1 for o in outcomes if o.state == "filtered")

    async def _identify_hosts(
        self, wanted: dict[str, list[int]]
    ) -> dict[str, dict[int, ServiceInfo]]:
        """Service identification on open ports only, after the sweep, several hosts at once
        (a network's live hosts would otherwise wait for each other), bounded in time; a
        tarpit's ports are left out by the caller."""
        wanted = {address: ports for address, ports in wanted.items() if ports}
        if not wanted or not self.job.config.service_detection:
            return {}
        count = sum(len(ports) for ports in wanted.values())
        self.reporter.announce(f"Identifying services on {count} open ports", "services")
        gate = asyncio.Semaphore(IDENTIFY_HOSTS)
        until = identify_deadline()

        async def one(address: str, ports: list[int]) -> dict[int, ServiceInfo]:
            async with gate:
                return await identify_services(address, ports, self.job.config, until)

        found = await asyncio.gather(*(one(a, ports) for a, ports in wanted.items()))
        return dict(zip(wanted, found, strict=True))

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
            **hosts_results(self.found),
        )
