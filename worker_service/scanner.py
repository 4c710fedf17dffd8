"""The TCP connect scan engine: ports are swept tier by tier, off the event loop.

Each tier is swept by the epoll loop in ``worker_service.shards``, in the calling thread for
small tiers or in one shard process per CPU for large ones: one Python process tops out near
50k connects/s on loopback, two pass nmap's ~45k. ``scan_host`` runs the whole blocking scan in
an executor thread; the event loop only receives throttled progress and the outcomes.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from resource import RLIMIT_NOFILE, getrlimit
from typing import TYPE_CHECKING, Final, NamedTuple, cast

from shared.ports import order_by_tier
from worker_service import shards
from worker_service.shards import REFUSED, Outcome

if TYPE_CHECKING:
    from shared.schemas import PortState

_RESERVED_FDS: Final = 64
SHARD_MIN_PORTS: Final = 4096
"""Below this many ports in a tier, starting shard processes costs more than it saves."""
PROGRESS_INTERVAL: Final = 0.25
"""Seconds between progress events within a tier; a full-range scan emits a handful, not 65k."""


# NamedTuples rather than dataclasses: importing dataclasses (and inspect with it) costs a
# one-shot scan command more than sweeping a thousand loopback ports does.
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


def effective_concurrency(requested: int) -> int:
    """The requested number of connects in flight, capped by the open-file limit."""
    soft, _hard = getrlimit(RLIMIT_NOFILE)
    return max(1, min(requested, soft - _RESERVED_FDS))


def shard_count(ports: int, requested: int | None = None) -> int:
    """Processes to sweep a tier of this many ports with: one per CPU for large tiers."""
    if requested is not None:
        return max(1, min(requested, ports))
    if ports < SHARD_MIN_PORTS:
        return 1
    cpus = len(os.sched_getaffinity(0)) or 1
    return max(1, min(cpus, ports // (SHARD_MIN_PORTS // 2)))


class _Progress:
    """Counts finished ports; calls back at tier starts, at most every interval, and at the end."""

    def __init__(self, callback: ProgressCallback | None, total: int, interval: float) -> None:
        self._callback = callback
        self._total = total
        self._interval = interval
        self._last = 0.0
        self.tier = ""
        self.scanned = 0
        self.open_ports: list[int] = []

    def emit(self) -> None:
        self._last = time.monotonic()
        if self._callback is not None:
            event = ScanProgressEvent(self.tier, self.scanned, self._total, sorted(self.open_ports))
            self._callback(event)

    def start_tier(self, tier: str) -> None:
        self.tier = tier
        self.emit()

    def advance(self, count: int, opened: list[int]) -> None:
        self.scanned += count
        self.open_ports.extend(opened)
        if time.monotonic() - self._last >= self._interval:
            self.emit()


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
    import ipaddress  # here, not at import: a one-shot scan command pays for every module

    ipaddress.ip_address(address.partition("%")[0])  # hostnames are resolved by the caller
    tiers = order_by_tier(ports)
    total = sum(len(tier_ports) for _tier, tier_ports in tiers)
    inflight = effective_concurrency(concurrency)
    progress = _Progress(on_progress, total, progress_interval)
    tick_interval = progress_interval / 2
    notable: dict[int, Outcome] = {}
    for tier, tier_ports in tiers:
        if stop is not None and stop.is_set():
            break
        progress.start_tier(tier)
        count = shard_count(len(tier_ports), shard_processes)
        if count == 1:
            found = shards.sweep(
                address,
                tier_ports,
                timeout=timeout,
                inflight=inflight,
                on_tick=progress.advance,
                tick_interval=tick_interval,
                stop=stop,
            )
        else:
            found = shards.sweep_sharded(
                address,
                tier_ports,
                timeout=timeout,
                inflight=inflight,
                shards=count,
                on_tick=progress.advance,
                tick_interval=tick_interval,
                stop=stop,
            )
        notable.update(found)
    if tiers:
        progress.emit()
    scanned = sorted(port for _tier, tier_ports in tiers for port in tier_ports)
    return [_outcome(port, notable.get(port, REFUSED)) for port in scanned]


def _outcome(port: int, outcome: Outcome) -> PortOutcome:
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
    # Imported here: asyncio costs ~40 ms to import, which a one-shot scan CLI need not pay.
    import asyncio

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
