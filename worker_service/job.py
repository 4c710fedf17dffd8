"""One delivery of a scan on a worker process: re-check the target, scan, report, store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar
from uuid import UUID

import asyncpg
from redis.client import Pipeline

from shared.errors import InvalidScan, PermanentError
from shared.ports import order_by_tier, parse_port_spec
from shared.protocol import MAX_DELIVERIES
from shared.resolve import resolve_target
from shared.schemas import PortResult, ScanConfig, ScanProgress, ScanResult, ScanTaskPayload
from shared.store import ScanRow, ScanStore
from shared.targets import parse_target
from worker_service.backend import Rider
from worker_service.probe.identify import ServiceInfo, identify, registered_name
from worker_service.probe.runner import (
    HostsResult,
    ScanProgressEvent,
    by_address,
    hosts_results,
    probe_limits,
    scan_hosts,
)
from worker_service.reporting import EventLog, ProgressReporter
from worker_service.runtime import WorkerRuntime

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_RETRIES = 3
IDENTIFY_CONCURRENCY = 64
IDENTIFY_HOSTS = 8
"""Hosts whose services are identified at once, each with up to IDENTIFY_CONCURRENCY."""
IDENTIFY_MIN_SECONDS = 1.0
IDENTIFY_MAX_SECONDS = 3.0
CANCEL_POLL_SECONDS = 0.5
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    # A server shutting down or starting up: admin shutdown, crash, "cannot connect now".
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    # Refused, reset, timed out, and a database host that no longer resolves (a stopped
    # container's name): all OSError, as the gateway's DB_ERRORS has it.
    OSError,
)


def retry_delay(retries: int, *, base: float = 1.0, cap: float = 30.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2**retries))


class PoisonMessage(PermanentError):
    """Delivered too often: each delivery ended with its worker gone."""

    code = "poison_message"


class ScanSkipped(Exception):
    """The scan was cancelled or ended before this delivery; nothing to run."""


class ScanCancelled(Exception):
    def __init__(self, partial: ScanResult) -> None:
        super().__init__("cancelled")
        self.partial = partial


class ShardScan(Exception):
    """Too large for one task: run it as these shards on several worker processes."""

    def __init__(self, addresses: list[str], plan: list[Shard]) -> None:
        super().__init__(f"{len(plan)} shards")
        self.addresses = addresses
        self.plan = plan


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


async def watch_cancel(store: ScanStore, scan_id: UUID, scan: asyncio.Future[Any]) -> bool:
    """Cancel ``scan`` when the scan's row asks for it; checked in PostgreSQL, so a cancel
    reaches a scan even when it was requested before this worker started."""
    while not scan.done():
        await asyncio.sleep(CANCEL_POLL_SECONDS)
        try:
            if await store.cancel_requested(scan_id):
                scan.cancel()
                return True
        except TRANSIENT_ERRORS as exc:
            log.warning("scan %s: cancel check failed: %r", scan_id, exc)
    return False


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


class ScanJob:
    """One delivery of a scan task on a worker process."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        job: ScanTaskPayload,
        task_id: str,
        update_state: Callable[[ScanProgress], None],
        publish_result: Callable[[ScanResult], None],
        *,
        retries: int = 0,
    ) -> None:
        self.runtime = runtime
        self.retries = retries
        """Deliveries of this scan that were Celery's own retries, not a lost worker's."""
        self.settings = runtime.settings
        self.job = job
        self.events = EventLog(
            runtime.redis(), self.settings.redis_prefix, task_id, self.settings.result_ttl
        )
        self.update_state = update_state
        self.publish_result = publish_result
        self.row: ScanRow | None = None
        self.result: ScanResult | None = None
        """The scan's result once it has one, while it is being stored."""
        self.waited = 0.0
        """Seconds this delivery waited for PostgreSQL before the scan could start."""

    async def run(self) -> ScanResult:
        began = time.monotonic()
        store = await self._wait_for_database()
        row = await self._with_db_retry(lambda: store.mark_running(self.job.scan_id))
        self.waited = time.monotonic() - began
        if row is None:
            raise InvalidScan(f"scan {self.job.scan_id} was never accepted by the gateway")
        self.row = row
        lost = row.attempts - 1 - self.retries  # earlier deliveries that ended with no retry
        if lost >= MAX_DELIVERIES and row.state == "running":
            raise PoisonMessage(
                f"delivered {lost} times without finishing (each time its worker was lost); "
                "moved to the dead-letter queue"
            )
        if row.state == "completed" and row.result is not None:
            return row.result  # a redelivery of a scan that already finished
        if row.state != "running":
            raise ScanSkipped(row.state)
        if row.cancel_requested:
            # Cancelled while it was running nowhere: its worker was lost, or it waited out a
            # retry's countdown. Nothing is probed now.
            raise ScanCancelled(self._not_started())
        target = parse_target(self.job.target, max_hosts=self.settings.max_hosts)
        addresses = await resolve_target(
            target, self.runtime.policy, timeout=self.settings.resolve_timeout
        )
        if target.kind == "hostname":
            addresses = addresses[:1]
        plan = plan_shards(
            addresses,
            parse_port_spec(self.job.ports),
            self.settings.shard_min_ports,
            self.settings.max_shards,
        )
        if plan is not None:
            raise ShardScan(addresses, plan)
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
        self.result = result
        await self._store_result(store, result)
        return result

    async def _wait_for_database(self) -> ScanStore:
        return await self._with_db_retry(self.runtime.store)

    async def _with_db_retry(
        self, action: Callable[[], Awaitable[T]], *, deadline: float | None = None
    ) -> T:
        """Run a database call, retrying with backoff and jitter until ``deadline`` (monotonic;
        by default ``db_retry_seconds`` from now)."""
        if deadline is None:
            deadline = time.monotonic() + self.settings.db_retry_seconds
        attempt = 0
        while True:
            try:
                return await action()
            except TRANSIENT_ERRORS as exc:
                attempt += 1
                delay = retry_delay(attempt, base=0.5, cap=15.0)
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "scan %s: database unavailable (%r), retrying in %.1fs",
                    self.job.scan_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _store_result(self, store: ScanStore, result: ScanResult) -> None:
        try:
            await store.complete(result)
        except TRANSIENT_ERRORS:
            # Readable from Redis while PostgreSQL is away; the write keeps retrying.
            self.publish_result(result)
            await self._with_db_retry(lambda: store.complete(result))

    async def _watch_cancel(self, store: ScanStore, scan: asyncio.Future[Any]) -> bool:
        return await watch_cancel(store, self.job.scan_id, scan)

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
        self.found: HostsResult | None = None
        found = await scan_hosts(
            addresses, ports, self.job.config, self._report, limits=probe_limits(self.settings)
        )
        self.reporter.finish_host(found.scanned)
        self.found = found
        services = await self._identify_hosts(
            {
                host.address: [o.port for o in found.outcomes[host.address] if o.state == "open"]
                for host in found.hosts
                if host.address in found.outcomes and not host.tarpit
            }
        )
        for host in found.hosts:
            outcomes = found.outcomes.get(host.address, [])
            known = services.get(host.address, {})
            for outcome in outcomes:
                if outcome.state == "open":
                    info = known.get(outcome.port)
                    self.open.append(port_result(host.address, outcome.port, outcome.reason, info))
            self.closed += sum(1 for o in outcomes if o.state == "closed")
            self.filtered += sum(1 for o in outcomes if o.state == "filtered")
        return self._result("completed", found.scanned)

    def _report(self, event: ScanProgressEvent) -> None:
        # Runs inline for short scans: a progress write that fails must not fail the scan.
        try:
            self.reporter.total = event.total_ports  # live hosts only, once discovery is done
            for address, one in by_address(event):
                if address is not None:
                    self.reporter.start_host(address)
                self.reporter(one)
        except Exception:
            log.exception("scan %s: progress not reported", self.job.scan_id)

    async def _identify_hosts(
        self, wanted: dict[str, list[int]]
    ) -> dict[str, dict[int, ServiceInfo]]:
        """Service identification on open ports only, after the sweep, several hosts at once
        (a network's live hosts would otherwise wait for each other), bounded in time."""
        wanted = {address: ports for address, ports in wanted.items() if ports}
        if not wanted or not self.job.config.service_detection:
            return {}
        count = sum(len(ports) for ports in wanted.values())
        self.reporter.announce(f"Identifying services on {count} open ports", "services")
        gate = asyncio.Semaphore(IDENTIFY_HOSTS)

        async def one(address: str, ports: list[int]) -> dict[int, ServiceInfo]:
            async with gate:
                return await identify_services(address, ports, self.job.config)

        found = await asyncio.gather(*(one(a, ports) for a, ports in wanted.items()))
        return dict(zip(wanted, found, strict=True))

    def _not_started(self) -> ScanResult:
        now = datetime.now(UTC)
        return ScanResult(
            scan_id=self.job.scan_id,
            target=self.job.target,
            ports=self.job.ports,
            total_ports_scanned=0,
            open_ports=[],
            status="revoked",
            progress=0,
            started_at=now,
            finished_at=now,
            duration_seconds=0.0,
        )

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
            **hosts_results(self.found),
        )

    async def with_db(
        self, write: Callable[[ScanStore], Awaitable[None]], *, seconds: float | None = None
    ) -> None:
        """A final write to PostgreSQL, retried while the database is away: for
        ``db_retry_seconds``, or ``seconds`` when given."""
        deadline = time.monotonic() + (
            self.settings.db_retry_seconds if seconds is None else seconds
        )
        store = await self._with_db_retry(self.runtime.store, deadline=deadline)
        await self._with_db_retry(lambda: write(store), deadline=deadline)

    def finish(self, state: str) -> None:
        """Tell stream readers the scan ended and give the key its active slot back."""
        self.events.write(("end", {"state": state}), release=self._owner)

    def final_writes(self) -> Rider:
        """What :meth:`finish` writes, to be sent with the task's final state instead."""
        owner = self._owner

        def add(pipe: Pipeline, state: str) -> None:
            self.events.add_to(pipe, ("end", {"state": state}), release=owner)

        return add

    @property
    def _owner(self) -> UUID | None:
        return self.row.api_key_id if self.row is not None else None
