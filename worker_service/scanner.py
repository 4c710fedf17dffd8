"""The TCP connect scan engine: ports are swept tier by tier off the event loop.

A tier is swept by the epoll loop of ``worker_service.shards``: in a worker thread for small
tiers, or in one shard process per CPU for large ones (a Python process tops out near 50k
connects/s on loopback; two shards reach nmap's rate and beyond). The event loop only receives
throttled progress and the final outcomes.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from resource import RLIMIT_NOFILE, getrlimit
from typing import TYPE_CHECKING, Final, cast

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
_SHARD_OUTPUT_LIMIT: Final = 1 << 24


class ScanEngineError(RuntimeError):
    """The engine itself failed (a shard process died); says nothing about the target."""


@dataclass(frozen=True, slots=True)
class PortOutcome:
    port: int
    state: PortState
    reason: str


@dataclass(slots=True)
class ScanProgressEvent:
    tier: str
    ports_scanned: int
    total_ports: int
    open_ports: list[int] = field(default_factory=list)


ProgressCallback = Callable[[ScanProgressEvent], None]


def effective_concurrency(requested: int) -> int:
    """The requested number of connects in flight, capped by the open-file limit."""
    soft, _hard = getrlimit(RLIMIT_NOFILE)
    return max(1, min(requested, soft - _RESERVED_FDS))


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) or 1


def shard_count(ports: int, requested: int | None = None) -> int:
    """Processes to sweep this many ports with: one per CPU for large tiers, else one."""
    if requested is not None:
        return max(1, min(requested, ports))
    if ports < SHARD_MIN_PORTS:
        return 1
    return max(1, min(available_cpus(), ports // (SHARD_MIN_PORTS // 2)))


class _Progress:
    """Counts finished ports and forwards them to the callback at most every interval."""

    def __init__(self, callback: ProgressCallback | None, total: int, interval: float) -> None:
        self._callback = callback
        self._total = total
        self._interval = interval
        self._loop = asyncio.get_running_loop()
        self._last = 0.0
        self.tier = ""
        self.scanned = 0
        self.open_ports: list[int] = []

    def emit(self) -> None:
        self._last = self._loop.time()
        if self._callback is not None:
            event = ScanProgressEvent(self.tier, self.scanned, self._total, sorted(self.open_ports))
            self._callback(event)

    def start_tier(self, tier: str) -> None:
        self.tier = tier
        self.emit()

    def advance(self, count: int, opened: list[int]) -> None:
        self.scanned += count
        self.open_ports.extend(opened)
        if self._loop.time() - self._last >= self._interval:
            self.emit()


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
    runs on the event loop at each tier start, at most every ``progress_interval`` seconds
    within a tier, and once at the end. ``shard_processes`` overrides the automatic choice.
    """
    ipaddress.ip_address(address.partition("%")[0])  # hostnames are resolved by the caller
    tiers = order_by_tier(ports)
    total = sum(len(tier_ports) for _tier, tier_ports in tiers)
    budget = effective_concurrency(concurrency)
    progress = _Progress(on_progress, total, progress_interval)
    notable: dict[int, Outcome] = {}
    for tier, tier_ports in tiers:
        progress.start_tier(tier)
        count = shard_count(len(tier_ports), shard_processes)
        if count == 1:
            found = await _sweep_in_thread(address, tier_ports, timeout, budget, progress)
        else:
            found = await _sweep_in_shards(address, tier_ports, timeout, budget, count, progress)
        notable.update(found)
    if tiers:
        progress.emit()
    scanned = sorted(port for _tier, tier_ports in tiers for port in tier_ports)
    return [_outcome(port, notable.get(port, REFUSED)) for port in scanned]


def _outcome(port: int, outcome: Outcome) -> PortOutcome:
    return PortOutcome(port, cast("PortState", outcome[0]), outcome[1])


async def _sweep_in_thread(
    address: str, ports: list[int], timeout: float, inflight: int, progress: _Progress
) -> dict[int, Outcome]:
    loop = asyncio.get_running_loop()
    stop = threading.Event()

    def tick(count: int, opened: list[int]) -> None:
        loop.call_soon_threadsafe(progress.advance, count, opened)

    job = functools.partial(
        shards.sweep,
        address,
        ports,
        timeout=timeout,
        inflight=inflight,
        on_tick=tick,
        tick_interval=PROGRESS_INTERVAL / 2,
        stop=stop,
    )
    try:
        return await loop.run_in_executor(None, job)
    finally:
        stop.set()  # a cancelled scan's thread ends within one short epoll wait


async def _sweep_in_shards(
    address: str,
    ports: list[int],
    timeout: float,
    budget: int,
    count: int,
    progress: _Progress,
) -> dict[int, Outcome]:
    size = -(-len(ports) // count)
    chunks = [ports[i : i + size] for i in range(0, len(ports), size)]
    inflight = max(1, budget // len(chunks))
    procs: list[asyncio.subprocess.Process] = []
    try:
        for _chunk in chunks:
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-I",
                    "-S",
                    shards.__file__,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    limit=_SHARD_OUTPUT_LIMIT,
                )
            )
        results = await asyncio.gather(
            *(
                _run_shard(proc, address, chunk, timeout, inflight, progress)
                for proc, chunk in zip(procs, chunks, strict=True)
            )
        )
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    notable: dict[int, Outcome] = {}
    for result in results:
        notable.update(result)
    return notable


async def _run_shard(
    proc: asyncio.subprocess.Process,
    address: str,
    ports: list[int],
    timeout: float,
    inflight: int,
    progress: _Progress,
) -> dict[int, Outcome]:
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    job = {
        "address": address,
        "ports": shards.encode_ranges(ports),
        "timeout": timeout,
        "inflight": inflight,
        "tick": PROGRESS_INTERVAL / 2,
    }
    proc.stdin.write(json.dumps(job).encode())
    await proc.stdin.drain()
    proc.stdin.close()
    result: dict[int, Outcome] | None = None
    async for line in proc.stdout:
        parsed = shards.parse_line(line)
        if isinstance(parsed, dict):
            result = parsed
        else:
            progress.advance(*parsed)
    errors = await proc.stderr.read()
    await proc.wait()
    if result is None or proc.returncode != 0:
        detail = errors.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise ScanEngineError(f"shard exited with {proc.returncode}: {detail[0]}")
    return result
