"""The TCP connect scan engine as the worker uses it: one outcome record per port, off the loop.

``worker_service.engine`` sweeps tier by tier with the epoll loop of ``worker_service.shards``,
in the calling thread for small tiers or in one shard process per CPU for large ones: one Python
process tops out near 50k connects/s on loopback, two pass nmap's ~45k. ``scan_host`` runs the
whole blocking scan in an executor thread; the event loop only receives throttled progress and
the outcomes.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, cast

from worker_service.engine import PROGRESS_INTERVAL, outcome_of, sweep_tiers

if TYPE_CHECKING:
    from shared.schemas import PortState


class PortOutcome(NamedTuple):
    port: int
    state: PortState
    reason: str


class ScanProgressEvent(NamedTuple):
    tier: str
    ports_scanned: int
    total_ports: int
    open_ports: list[int]


ProgressCallback = Callable[[ScanProgressEvent], None]


def scan_blocking(
    address: str,
    ports: Sequence[int],
    *,
    timeout: float,
    concurrency: int,
    on_progress: ProgressCallback | None = None,
    shard_processes: int | None = None,
    progress_interval: float = PROGRESS_INTERVAL,
    stop: threading.Event | None = None,
) -> list[PortOutcome]:
    """``scan_host`` without the event loop: blocks the calling thread, calls back in it.

    A set ``stop`` ends the scan early (within ~0.1 s); the outcomes are then incomplete.
    """
    tier_progress = None
    if on_progress is not None:
        callback = on_progress

        def tier_progress(tier: str, scanned: int, total: int, open_ports: list[int]) -> None:
            callback(ScanProgressEvent(tier, scanned, total, open_ports))

    scanned, notable = sweep_tiers(
        address,
        ports,
        timeout=timeout,
        concurrency=concurrency,
        on_progress=tier_progress,
        shard_processes=shard_processes,
        progress_interval=progress_interval,
        stop=stop,
    )
    return [_outcome(port, outcome_of(notable, port)) for port in scanned]


def _outcome(port: int, outcome: tuple[str, str]) -> PortOutcome:
    return PortOutcome(port, cast("PortState", outcome[0]), outcome[1])


async def scan_host(
    address: str,
    ports: Sequence[int],
    *,
    timeout: float,
    concurrency: int,
    on_progress: ProgressCallback | None = None,
    shard_processes: int | None = None,
    progress_interval: float = PROGRESS_INTERVAL,
) -> list[PortOutcome]:
    """Probe every port of one literal IPv4/IPv6 address, tier by tier (a tier finishes before
    the next starts); returns one outcome per distinct port, sorted by port.

    ``timeout`` bounds each connect from its own attempt. ``concurrency`` is the connects in
    flight, capped by the open-file limit and split across shard processes. ``on_progress``
    runs on the event loop's thread at each tier start, at most every ``progress_interval``
    seconds within a tier, and once at the end. ``shard_processes`` overrides the automatic
    choice of one process per CPU for tiers of ``SHARD_MIN_PORTS`` or more.
    """
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    forward: ProgressCallback | None = None
    if on_progress is not None:
        callback = on_progress

        def forward(event: ScanProgressEvent) -> None:
            loop.call_soon_threadsafe(callback, event)

    job = functools.partial(
        scan_blocking,
        address,
        ports,
        timeout=timeout,
        concurrency=concurrency,
        on_progress=forward,
        shard_processes=shard_processes,
        progress_interval=progress_interval,
        stop=stop,
    )
    try:
        return await loop.run_in_executor(None, job)
    finally:
        stop.set()  # a cancelled scan's thread and shard processes end within ~0.1 s
