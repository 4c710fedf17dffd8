"""Large scans split into shards on several worker processes, joined in PostgreSQL, merged.

The user keeps the one task id the gateway gave out. The scan's delivery records its shards as
rows (``scan_shards``) and the task layer publishes them; each shard records its typed outcome
there, and the shard that records the last one (decided under the scan row's lock, in the same
transaction) has the merge published. The merge builds the one result and ends the scan through
``lifecycle.finish``. A shard that fails, runs past its limit or is dead-lettered fails the scan
at once; one whose worker is killed at its hard limit leaves the scan to the reaper. Shards
write their progress into a Redis hash (progress only: losing Redis loses no scan).

A network scan is split after its host discovery (``job.discover_first``): its shards hold
only live hosts and take discovery's answer from the scan row instead of pinging again, and
the merge lists every address, the down ones as discovery found them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel
from redis.exceptions import RedisError

from shared.errors import PermanentError
from shared.ports import parse_port_spec
from shared.protocol import MAX_DELIVERIES
from shared.redis_keys import shards_key
from shared.retry import TRANSIENT_ERRORS, retry
from shared.schemas import HostResult, PortResult, ScanProgress, ScanResult, ScanTaskPayload
from shared.store import ScanRow, ShardOutcome, ShardRow
from shared.targets import parse_target
from worker_service.job import (
    Runtime,
    identify_deadline,
    identify_services,
    port_result,
    probe,
    sharded_reap_seconds,
)
from worker_service.lifecycle import (
    Cancelled,
    Completed,
    Delivery,
    Failed,
    Outcome,
    Requeue,
    RetryLater,
    Skipped,
    hand_back,
    run_watched,
    start_delivery,
)
from worker_service.plan import known_states, shard_payload
from worker_service.probe.identify import ServiceInfo
from worker_service.probe.runner import ScanProgressEvent, hosts_results, probe_limits
from worker_service.reporting import PROGRESS_INTERVAL, EventLog

log = logging.getLogger(__name__)


class ShardFindings(BaseModel):
    """A shard's result as stored in its row."""

    open: list[tuple[str, int, str]] = []
    closed: int = 0
    filtered: int = 0
    scanned: int = 0
    hosts: list[HostResult] = []
    """The shard's addresses as the engine reported them (probes, tarpit flags, ...)."""


@dataclass(frozen=True, slots=True)
class Recorded:
    """The shard's outcome is in PostgreSQL; ``merge``: it was the last, publish the merge."""

    merge: bool
    label: ClassVar[str] = "sharded"


ShardDelivery = Recorded | Skipped | Failed | RetryLater | Requeue


@dataclass(frozen=True, slots=True)
class DuplicateMerge:
    """Another merge message (``claimed_by``) runs this scan's merge: this one does nothing
    (no write, no end event, no metric) and is acked."""

    claimed_by: str
    label: ClassVar[str] = "sharded"


class ShardProgress:
    """One shard's share of the scan's progress, summed over all shards in Redis."""

    def __init__(
        self,
        events: EventLog,
        index: int,
        total: int,
        update_parent: Callable[[ScanProgress], None],
    ) -> None:
        self.events = events
        self.client = events.client
        self.key = shards_key(events.prefix, events.task_id)
        self.index = index
        self.total = total
        self.update_parent = update_parent
        self.base = 0
        self.address = ""
        self.open: list[tuple[str, int]] = []
        self.announced = 0
        self.last_sent = 0.0

    def start_host(self, address: str) -> None:
        self.address = address

    def finish_host(self, ports_scanned: int) -> None:
        self.base += ports_scanned

    def __call__(self, event: ScanProgressEvent) -> None:
        seen = {port for address, port in self.open if address == self.address}
        self.open.extend((self.address, p) for p in event.open_ports if p not in seen)
        now = time.monotonic()
        if now - self.last_sent < PROGRESS_INTERVAL or not self.events.available:
            return
        self.last_sent = now
        done = self.base + event.ports_scanned
        self.events.post_latest(partial(self._deliver, done, event.tier, list(self.open)))

    def _deliver(self, done: int, tier: str, found: list[tuple[str, int]]) -> None:
        """The Redis side of a progress event, where the scan's writes run (``post``)."""
        if not self.events.available:
            return
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(self.key, str(self.index), orjson.dumps({"done": done, "tier": tier}))
                pipe.expire(self.key, self.events.ttl)
                pipe.hvals(self.key)
                shards = pipe.execute()[-1]
        except (RedisError, OSError) as exc:
            log.warning("scan %s: shard progress not written: %r", self.events.task_id, exc)
            self.events.gate.failed()
            return
        scanned = sum(orjson.loads(raw)["done"] for raw in shards)
        progress = ScanProgress(
            status=f"Scanning {tier} priority ports in shards",
            progress=min(99, scanned * 100 // self.total) if self.total else 0,
            tier=tier,
            ports_scanned=scanned,
            total_ports=self.total,
            open_ports=[port for _, port in found],
        )
        fresh = found[self.announced :]
        if self.events.write(
            *(("port", {"port": p, "address": a, "state": "open"}) for a, p in fresh),
            ("progress", progress.model_dump(mode="json")),
        ):
            self.announced = len(found)
            self.update_parent(progress)


async def deliver_shard(
    runtime: Runtime,
    delivery: Delivery,
    job: ScanTaskPayload,
    index: int,
    events: EventLog,
    update_parent: Callable[[ScanProgress], None],
) -> tuple[ShardDelivery, ScanRow | None]:
    """Sweep shard ``index`` of ``job`` and record its outcome; a ``Failed`` fails the scan."""
    settings = runtime.settings
    reap = delivery.hard + sharded_reap_seconds(job, [], settings)
    opened = await start_delivery(
        runtime.store,
        delivery,
        settings.db_retry_seconds,
        f"shard {index} of {job.scan_id}",
        lambda store: store.shard_started(job.scan_id, index, reap),
    )
    if isinstance(opened, RetryLater | Requeue):
        return opened, None
    store, started = opened
    if started is None:
        return Skipped("revoked"), None  # the scan was deleted
    shard, row = started
    if shard.outcome is not None:
        # A duplicate of a shard already recorded; if the scan waits for its merge still, the
        # merge's publish may have failed: publish it again (a second merge changes nothing).
        return Recorded(row.state == "running" and row.shards_done == row.shards_total), row
    if row.state != "running":
        return Skipped(row.state), row
    if shard.lost_deliveries >= MAX_DELIVERIES:
        return Failed(
            f"shard {index} was delivered {shard.lost_deliveries} times without finishing (each"
            " time its worker was lost); moved to the dead-letter queue",
            dead_letter=True,
        ), row
    outcome, findings, error = await _sweep(
        runtime, delivery, job, shard, row, events, update_parent
    )
    write_deadline = delivery.write_deadline(settings.db_retry_seconds)
    try:
        last = await retry(
            lambda: store.record_shard(
                job.scan_id, index, outcome, findings.model_dump(mode="json"), error
            ),
            write_deadline,
        )
    except TRANSIENT_ERRORS as exc:
        return hand_back(
            delivery, f"database unavailable while recording shard {index}: {exc!r}"
        ), row
    if error is not None:
        return Failed(error), row
    return Recorded(merge=last), row


async def _sweep(
    runtime: Runtime,
    delivery: Delivery,
    job: ScanTaskPayload,
    shard: ShardRow,
    row: ScanRow,
    events: EventLog,
    update_parent: Callable[[ScanProgress], None],
) -> tuple[ShardOutcome, ShardFindings, str | None]:
    findings = ShardFindings()
    if row.cancel_requested:
        return "cancelled", findings, None
    try:
        _recheck_policy(runtime, job, shard.addresses)
    except PermanentError as exc:
        return "failed", findings, f"shard {shard.index}: {exc}"
    store = await runtime.store()
    ports = parse_port_spec(shard.ports)
    # Split after discovery: the shard probes live hosts only, and does not discover again.
    states = known_states(row.discovery) if row.discovery is not None else None
    live = [a for a in row.addresses if states is None or states[a].up]
    total = len(parse_port_spec(job.ports)) * len(live)
    progress = ShardProgress(events, shard.index, total, update_parent)

    async def sweep() -> None:
        # The shards are the split across processes already: one probe process each.
        limits = probe_limits(runtime.settings)._replace(probe_processes=1)
        addresses = list(shard.addresses)
        found = await probe(
            addresses,
            ports,
            shard_payload(job, row.shards_total or 1, shard.index).config,
            progress,
            limits=limits,
            known={a: states[a] for a in addresses} if states is not None else None,
        )
        findings.hosts = hosts_results(found)["hosts"]
        for address, outcomes in found.outcomes.items():
            findings.scanned += len(outcomes)
            for outcome in outcomes:
                if outcome.state == "open":
                    findings.open.append((address, outcome.port, outcome.reason))
                elif outcome.state == "closed":
                    findings.closed += 1
                else:
                    findings.filtered += 1

    try:
        async with asyncio.timeout(delivery.work_deadline.remaining):
            stopped = await run_watched(
                sweep(), lambda: store.should_stop(job.scan_id), f"shard {shard.index}"
            )
    except TimeoutError:
        return "failed", findings, f"a shard exceeded its time limit ({delivery.soft:g} s)"
    if stopped:
        known = {(a, p) for a, p, _ in findings.open}
        findings.open += [(a, p, "syn-ack") for a, p in progress.open if (a, p) not in known]
        return "cancelled", findings, None
    return "completed", findings, None


def _recheck_policy(runtime: Runtime, job: ScanTaskPayload, addresses: tuple[str, ...]) -> None:
    """The policy may have changed since the scan was split: check again before probing."""
    target = parse_target(job.target, max_hosts=runtime.settings.max_hosts)
    policy = runtime.policy.excluding(job.exclude)
    if target.kind == "hostname":
        policy.check_hostname(target.value)
    for address in addresses:
        policy.check_address(address)


async def deliver_merge(
    runtime: Runtime, delivery: Delivery, job: ScanTaskPayload
) -> tuple[Outcome | DuplicateMerge, ScanRow | None]:
    """Join the shards' outcomes into the scan's one result, identifying services on its open
    ports under the merge's time limit and the cancel watch."""
    settings = runtime.settings
    reap = delivery.reap_seconds(settings.db_retry_seconds)

    what = f"the merge of {job.scan_id}"
    opened = await start_delivery(
        runtime.store,
        delivery,
        settings.db_retry_seconds,
        what,
        lambda store: store.merge_started(job.scan_id, delivery.task_id, reap),
    )
    if isinstance(opened, RetryLater | Requeue):
        return opened, None
    store, started = opened
    if started is None:
        return Skipped("revoked"), None
    # Read on its own: a retry of this read must not count the merge's delivery again.
    deadline = delivery.work_deadline.sooner(settings.db_retry_seconds)
    try:
        shards = await retry(lambda: store.shards(job.scan_id), deadline)
    except TRANSIENT_ERRORS as exc:
        return hand_back(delivery, f"database unavailable before {what} could start: {exc!r}"), None
    row, claimed = started
    if not claimed:
        return DuplicateMerge(row.merge_task or ""), row
    if row.state == "completed" and row.result is not None:
        return Completed(row.result), row
    if row.state != "running":
        return Skipped(row.state), row
    if row.lost_merges >= MAX_DELIVERIES:
        lost = row.lost_merges
        return Failed(
            f"the merge was delivered {lost} times without finishing (each time its worker was"
            " lost); moved to the dead-letter queue",
            dead_letter=True,
        ), row
    errors = sorted({s.error for s in shards if s.outcome == "failed" and s.error})
    if errors:
        return Failed("; ".join(errors)), row
    if any(s.outcome is None for s in shards):
        return Failed("the merge ran before every shard had finished"), row
    merge = Merge(job, row, [ShardFindings.model_validate(s.result or {}) for s in shards])
    if row.cancel_requested or any(s.outcome == "cancelled" for s in shards):
        return Cancelled(merge.result("revoked")), row
    try:
        async with asyncio.timeout(delivery.work_deadline.remaining):
            stopped = await run_watched(
                merge.identify(), lambda: store.should_stop(job.scan_id), f"merge {job.scan_id}"
            )
    except TimeoutError:
        return Failed(f"the merge exceeded its time limit ({delivery.soft:g} s)"), row
    return (Cancelled(merge.result("revoked")) if stopped else Completed(merge.result())), row


class Merge:
    """One result from the shards' findings; services identified unless cancelled first."""

    def __init__(self, job: ScanTaskPayload, row: ScanRow, shards: list[ShardFindings]) -> None:
        self.job = job
        self.addresses = list(row.addresses)
        self.started = row.started_at or datetime.now(UTC)
        self.shards = shards
        found: dict[str, set[tuple[int, str]]] = {}
        for shard in shards:
            for address, port, reason in shard.open:
                found.setdefault(address, set()).add((port, reason))
        self.found = {address: sorted(ports) for address, ports in sorted(found.items())}
        self.hosts = merge_hosts(self.addresses, row.discovery, shards)
        self.services: dict[str, dict[int, ServiceInfo]] = {}

    async def identify(self) -> None:
        if not self.job.config.service_detection:
            return
        tarpits = {host.address for host in self.hosts if host.tarpit}
        until = identify_deadline()
        for address, found in self.found.items():
            if address in tarpits:
                continue  # its open ports are listed, its services not identified
            ports = [p for p, _ in found]
            self.services[address] = await identify_services(address, ports, self.job.config, until)

    def result(self, status: Literal["completed", "revoked"] = "completed") -> ScanResult:
        open_ports: list[PortResult] = []
        for address, found in self.found.items():
            services = self.services.get(address, {})
            open_ports += [port_result(address, p, r, services.get(p)) for p, r in found]
        scanned = sum(s.scanned for s in self.shards)
        swept = [h for h in self.hosts if h.state == "up"] if self.hosts else self.addresses
        total = len(parse_port_spec(self.job.ports)) * len(swept)
        finished = datetime.now(UTC)
        cancelled = status == "revoked"
        return ScanResult(
            scan_id=self.job.scan_id,
            target=self.job.target,
            addresses=self.addresses,
            ports=self.job.ports,
            total_ports_scanned=scanned,
            open_ports=open_ports,
            closed_ports=sum(s.closed for s in self.shards),
            filtered_ports=sum(s.filtered for s in self.shards),
            status=status,
            progress=min(99, scanned * 100 // max(1, total)) if cancelled else 100,
            started_at=self.started,
            finished_at=finished,
            duration_seconds=round((finished - self.started).total_seconds(), 6),
            shards=len(self.shards),
            hosts=self.hosts,
            probes_sent=sum(host.probes for host in self.hosts),
            retransmissions=sum(host.retransmissions for host in self.hosts),
        )


def merge_hosts(
    addresses: list[str], discovery: list[dict[str, Any]] | None, shards: list[ShardFindings]
) -> list[HostResult]:
    """Every address of the scan once, in its order: as its shards reported it (one host's
    ports may be split over several shards: counts add up, a tarpit flag in any stands), or
    as discovery found it when it was down and so in no shard."""
    reported: dict[str, list[HostResult]] = {}
    for shard in shards:
        for host in shard.hosts:
            reported.setdefault(host.address, []).append(host)
    down = {host["address"]: host["reason"] for host in discovery or () if not host["up"]}
    hosts: list[HostResult] = []
    for address in addresses:
        parts = reported.get(address)
        if parts:
            up = [part for part in parts if part.state == "up"]
            first = (up or parts)[0]
            rtts = [part.rtt_ms for part in parts if part.rtt_ms is not None]
            hosts.append(
                first.model_copy(
                    update={
                        "rtt_ms": min(rtts) if rtts else None,
                        "probes": sum(part.probes for part in parts),
                        "retransmissions": sum(part.retransmissions for part in parts),
                        "unresponsive": bool(up) and all(part.unresponsive for part in up),
                        "tarpit": any(part.tarpit for part in parts),
                    }
                )
            )
        elif address in down:
            hosts.append(HostResult(address=address, state="down", reason=down[address]))
    return hosts
