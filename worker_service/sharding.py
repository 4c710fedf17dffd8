"""Large scans as a Celery chord: shards on several worker processes, then one merge.

The user keeps the one task id the gateway gave out. Shards write their progress into a
Redis hash and publish the sum as that task's PROGRESS; the merge stores the result as that
task's SUCCESS, in PostgreSQL, and ends its event stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from celery import Celery, chord
from redis.exceptions import RedisError

from shared.ports import format_port_spec, parse_port_spec
from shared.protocol import MERGE_TASK, PRIORITIES, SHARD_TASK, time_limits
from shared.redis_keys import chord_key, shards_key
from shared.schemas import PortResult, ScanProgress, ScanResult, ScanTaskPayload
from worker_service.job import Shard, identify_services, port_result, watch_cancel
from worker_service.probe.runner import ScanProgressEvent, by_address, probe_limits, scan_hosts
from worker_service.reporting import PROGRESS_INTERVAL, EventLog
from worker_service.runtime import WorkerRuntime


def dispatch(
    app: Celery,
    job: ScanTaskPayload,
    parent_task_id: str,
    addresses: list[str],
    plan: list[Shard],
    started: datetime,
    announce: Callable[[], None],
) -> bool:
    """Publish the shards and their merge; False when an earlier delivery already did.

    ``announce`` runs before anything is published, so the parent's PROGRESS can never land
    after a fast merge has stored its SUCCESS."""
    settings = app.conf.cybersec_settings
    client = app.backend.client  # type: ignore[attr-defined]  # the Redis result backend
    with contextlib.suppress(RedisError, OSError):
        if not client.set(
            chord_key(settings.redis_prefix, parent_task_id), 1, nx=True, ex=settings.result_ttl
        ):
            return False
    payload = job.model_dump(mode="json")
    priority = PRIORITIES[job.priority]
    header = []
    for index, (addresses, ports) in enumerate(plan):
        hard, soft = time_limits(job, len(ports), len(addresses), cap=settings.max_scan_seconds)
        header.append(
            app.signature(
                SHARD_TASK,
                args=(payload, parent_task_id, index, addresses, format_port_spec(ports)),
                priority=priority,
                queue=settings.scan_queue,
                time_limit=hard,
                soft_time_limit=soft,
            )
        )
    merge = app.signature(
        MERGE_TASK,
        args=(payload, parent_task_id, addresses, started.isoformat()),
        priority=priority,
        queue=settings.scan_queue,
    )
    announce()
    chord(header, app=app)(merge)
    return True


class ShardProgress:
    """One shard's share of the scan's progress, summed over all shards in Redis."""

    def __init__(
        self,
        runtime: WorkerRuntime,
        parent_task_id: str,
        index: int,
        total: int,
        update_parent: Callable[[ScanProgress], None],
    ) -> None:
        settings = runtime.settings
        self.client = runtime.redis()
        self.key = shards_key(settings.redis_prefix, parent_task_id)
        self.ttl = settings.result_ttl
        self.events = EventLog(self.client, settings.redis_prefix, parent_task_id, self.ttl)
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

    def __call__(self, event: ScanProgressEvent) -> None:
        seen = {port for address, port in self.open if address == self.address}
        self.open.extend((self.address, p) for p in event.open_ports if p not in seen)
        now = time.monotonic()
        if now - self.last_sent < PROGRESS_INTERVAL or not self.events.available:
            return
        self.last_sent = now
        done = self.base + event.ports_scanned
        try:
            with self.client.pipeline(transaction=False) as pipe:
                pipe.hset(
                    self.key, str(self.index), orjson.dumps({"done": done, "tier": event.tier})
                )
                pipe.expire(self.key, self.ttl)
                pipe.hvals(self.key)
                shards = pipe.execute()[-1]
        except (RedisError, OSError):
            return
        scanned = sum(orjson.loads(raw)["done"] for raw in shards)
        progress = ScanProgress(
            status=f"Scanning {event.tier} priority ports in shards",
            progress=min(99, scanned * 100 // self.total) if self.total else 0,
            tier=event.tier,
            ports_scanned=scanned,
            total_ports=self.total,
            open_ports=[port for _, port in self.open],
        )
        fresh = self.open[self.announced :]
        if self.events.write(
            *(("port", {"port": p, "address": a, "state": "open"}) for a, p in fresh),
            ("progress", progress.model_dump(mode="json")),
        ):
            self.announced = len(self.open)
            self.update_parent(progress)


async def run_shard(
    runtime: WorkerRuntime,
    job: ScanTaskPayload,
    addresses: list[str],
    ports: list[int],
    progress: ShardProgress,
) -> dict[str, Any]:
    """Sweep this shard's probes; stops early, marked cancelled, when the scan is cancelled."""
    store = await runtime.store()
    outcome: dict[str, Any] = {"open": [], "closed": 0, "filtered": 0, "scanned": 0}

    def report(event: ScanProgressEvent) -> None:
        for address, one in by_address(event):
            if address is not None:
                progress.start_host(address)
            progress(one)

    async def sweep() -> None:
        # One sweep of all the shard's addresses: discovery, hosts interleaved (issue 15).
        limits = probe_limits(runtime.settings)._replace(probe_processes=1)
        found = await scan_hosts(addresses, ports, job.config, report, limits=limits)
        outcome["scanned"] += found.scanned
        for address, results in found.outcomes.items():
            for result in results:
                if result.state == "open":
                    outcome["open"].append([address, result.port, result.reason])
                elif result.state == "closed":
                    outcome["closed"] += 1
                else:
                    outcome["filtered"] += 1

    scan = asyncio.ensure_future(sweep())
    watcher = asyncio.ensure_future(watch_cancel(store, job.scan_id, scan))
    try:
        await scan
    except asyncio.CancelledError:
        if not watcher.done() or not watcher.result():
            raise
        outcome["cancelled"] = True
        outcome["open"] += [
            [a, p, "syn-ack"] for a, p in progress.open if [a, p, "syn-ack"] not in outcome["open"]
        ]
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return outcome


async def merge_shards(
    job: ScanTaskPayload,
    shards: list[dict[str, Any]],
    addresses: list[str],
    started: datetime,
    *,
    cancel_requested: bool = False,
) -> ScanResult:
    """One result from the shards' outcomes, with services identified on the open ports
    unless the scan was cancelled (then it is a revoked result of what the shards found)."""
    by_address: dict[str, list[tuple[int, str]]] = {}
    for shard in shards:
        for address, port, reason in shard["open"]:
            by_address.setdefault(address, []).append((port, reason))
    cancelled = cancel_requested or any(shard.get("cancelled") for shard in shards)
    open_ports: list[PortResult] = []
    for address, found in sorted(by_address.items()):
        found = sorted(set(found))
        services = {}
        if job.config.service_detection and not cancelled:
            services = await identify_services(address, [p for p, _ in found], job.config)
        open_ports += [port_result(address, p, r, services.get(p)) for p, r in found]
    scanned = sum(shard["scanned"] for shard in shards)
    total = len(parse_port_spec(job.ports)) * len(addresses)
    finished = datetime.now(UTC)
    return ScanResult(
        scan_id=job.scan_id,
        target=job.target,
        addresses=addresses,
        ports=job.ports,
        total_ports_scanned=scanned,
        open_ports=open_ports,
        closed_ports=sum(shard["closed"] for shard in shards),
        filtered_ports=sum(shard["filtered"] for shard in shards),
        status="revoked" if cancelled else "completed",
        progress=100 if not cancelled else min(99, scanned * 100 // max(1, total)),
        started_at=started,
        finished_at=finished,
        duration_seconds=round((finished - started).total_seconds(), 6),
        shards=len(shards),
    )
