"""Task and queue names, priorities, and the one builder of Celery protocol-v2 scan messages.

Anything that publishes a scan (the gateway, benchmarks, tests) builds the message here, so the
wire format a worker must accept is defined in exactly one place.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Final
from uuid import UUID

from shared import codec
from shared.schemas import Priority, ScanTaskPayload
from shared.settings import Settings

SCAN_TASK: Final = "cybersec.scan"
SHARD_TASK: Final = "cybersec.scan_shard"
"""One part of a large scan; the worker that took the scan publishes these itself."""
MERGE_TASK: Final = "cybersec.scan_merge"
"""Joins a large scan's shards into its one result; published by the shard that recorded the
last shard outcome (see ``worker_service.sharding``)."""
MAX_PRIORITY: Final = 10
PRIORITIES: Final[dict[Priority, int]] = {"low": 1, "normal": 4, "high": 7, "critical": 10}
STORING: Final = "STORING"
"""Task state of a finished scan whose result is in Redis while PostgreSQL is unreachable."""
MAX_DELIVERIES: Final = 5
"""Deliveries of one message before it is dead-lettered (see the worker's poison guard)."""


def queue_for(priority: int, scan_queue: str, critical_queue: str) -> str:
    """The queue a message of this AMQP priority goes to: critical scans (and their shards and
    merges) to the critical queue, which reserved worker processes consume, everything else to
    the scan queue. Workers of the scan queue consume the critical queue too, so a free normal
    process also takes a critical scan; a critical scan published before this routing existed
    is still in the scan queue, where it keeps its priority."""
    return critical_queue if priority >= PRIORITIES["critical"] else scan_queue


def queue_arguments(dead_letter_queue: str) -> dict[str, Any]:
    """Arguments of the scan queue; every declarer must pass exactly these or RabbitMQ refuses."""
    return {
        "x-max-priority": MAX_PRIORITY,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": dead_letter_queue,
    }


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """The settings every scan's time limits follow from; the gateway, the dispatcher and the
    workers must share them (the chart and compose give every service the same)."""

    cap: int
    """``CYBERSEC_MAX_SCAN_SECONDS``: the most a soft limit may be."""
    margin: int
    """``CYBERSEC_HARD_LIMIT_MARGIN``: from the soft limit to the hard one."""
    rate_ceiling: int
    """``CYBERSEC_PROBE_RATE_CEILING``: the workers' cap on a scan task's rate (0: none)."""

    @classmethod
    def of(cls, settings: Settings) -> LimitPolicy:
        return cls(
            settings.max_scan_seconds, settings.hard_limit_margin, settings.probe_rate_ceiling
        )


def paced_rate(rate: int | None, ceiling: int) -> int | None:
    """Probes per second a scan of ``config.rate`` sends under the workers' ceiling (0: none);
    None when nothing paces it."""
    rates = [r for r in (rate, ceiling) if r]
    return min(rates) if rates else None


def too_slow(port_count: int, host_count: int, rate: int | None, limits: LimitPolicy) -> str | None:
    """Why a scan cannot end within ``CYBERSEC_MAX_SCAN_SECONDS`` at the rate it is paced to
    (its ``config.rate`` under the workers' ceiling), or None: each (address, port) pair costs
    at least one probe, so no time limit could hold it. The gateway and schedules both ask."""
    paced = paced_rate(rate, limits.rate_ceiling)
    pairs = port_count * host_count
    if paced is None or pairs / paced <= limits.cap:
        return None
    why = " (the workers' CYBERSEC_PROBE_RATE_CEILING)" if rate is None or paced < rate else ""
    return (
        f"{pairs} probes at rate {paced}/s{why} take at least {pairs / paced:.0f} s; the"
        f" bound is {limits.cap} s (CYBERSEC_MAX_SCAN_SECONDS)"
    )


def time_limits(
    payload: ScanTaskPayload,
    port_count: int,
    host_count: int = 1,
    *,
    policy: LimitPolicy,
) -> tuple[int, int]:
    """(hard, soft) seconds for a scan: its worst case with every port filtered (each probe
    sent 1 + retries times, paced to its rate capped by the workers' ceiling), its host
    discovery, plus slack for identification and writes, capped so the hard limit stays under
    RabbitMQ's consumer timeout (the gateway refuses a scan whose rate alone needs more than
    the cap)."""
    config = payload.config
    rate = paced_rate(config.rate, policy.rate_ceiling)
    pairs = port_count * host_count
    sends = 1 + config.retries
    rounds = -(-pairs // max(config.max_concurrent, 1))
    worst = rounds * config.timeout * sends
    if rate:
        worst = max(worst, pairs * sends / rate)
    if config.discovery or (config.discovery is None and host_count > 1):
        # Echoes to every host in parallel, each sent 1 + retries times, paced to the rate.
        worst += config.timeout * sends + (3 * host_count * sends / rate if rate else 0)
    soft = min(policy.cap, int(60 + 2 * worst))
    return soft + policy.margin, soft


@dataclass(frozen=True, slots=True)
class TaskMessage:
    """An AMQP message ready to publish: body bytes plus the properties Celery reads."""

    body: bytes
    headers: dict[str, Any]
    correlation_id: str
    priority: int
    content_type: str = codec.CONTENT_TYPE
    content_encoding: str = codec.CONTENT_ENCODING
    delivery_mode: int = 2
    properties: dict[str, Any] = field(default_factory=dict)


def _origin() -> str:
    # Read per message, not at import: a forked server process has its own pid.
    return f"gateway@{socket.gethostname()}:{os.getpid()}"


def build_scan_message(
    task_id: UUID,
    payload: ScanTaskPayload,
    *,
    port_count: int,
    host_count: int = 1,
    origin: str | None = None,
    limits: LimitPolicy,
) -> TaskMessage:
    """A Celery message protocol v2 message running ``SCAN_TASK(payload)``."""
    args = [payload.model_dump(mode="json")]
    kwargs: dict[str, Any] = {}
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    hard, soft = time_limits(payload, port_count, host_count, policy=limits)
    tid = str(task_id)
    headers: dict[str, Any] = {
        "lang": "py",
        "task": SCAN_TASK,
        "id": tid,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [hard, soft],
        "root_id": tid,
        "parent_id": None,
        "argsrepr": repr((payload.target, payload.ports)),
        "kwargsrepr": "{}",
        "origin": origin or _origin(),
        "ignore_result": False,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }
    return TaskMessage(
        body=codec.dumps([args, kwargs, embed]),
        headers=headers,
        correlation_id=tid,
        priority=PRIORITIES[payload.priority],
    )
