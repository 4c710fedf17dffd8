"""The blocking scan core: ports swept tier by tier, in this process or in shard processes.

``scanner`` wraps it for the worker (outcome records, an executor thread, the event loop); a
one-shot scan command calls it directly. It imports only C-level standard modules at run time
(no ``typing``, ``socket``, ``re`` or ``collections``): a command that scans a thousand loopback
ports in ~20 ms would otherwise spend twice that importing.
"""

from __future__ import annotations

import os
import time
from _socket import AF_INET, AF_INET6, inet_pton
from resource import RLIMIT_NOFILE, getrlimit

from shared.ports import order_by_tier
from worker_service import shards
from worker_service.shards import REFUSED

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Sequence
    from typing import Final

    from worker_service.shards import Outcome

    TierProgress = Callable[[str, int, int, list[int]], None]
    """Called with (tier, ports scanned, total ports, open ports so far, sorted)."""

_RESERVED_FDS: Final = 64
SHARD_MIN_PORTS: Final = 4096
"""Below this many ports in a tier, starting shard processes costs more than it saves."""
PROGRESS_INTERVAL: Final = 0.25
"""Seconds between progress events within a tier; a full-range scan emits a handful, not 65k."""


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


def check_address(address: str) -> None:
    """Raise ValueError unless ``address`` is a literal IPv4 or IPv6 address (hostnames are
    resolved by the caller); an IPv6 zone (``fe80::1%eth0``) is allowed."""
    literal = address.partition("%")[0]
    try:
        inet_pton(AF_INET6 if ":" in literal else AF_INET, literal)
    except OSError:
        raise ValueError(f"{address!r} is not an IP address") from None


class _Progress:
    """Counts finished ports; calls back at tier starts, at most every interval, and at the end."""

    def __init__(self, callback: TierProgress | None, total: int, interval: float) -> None:
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
            self._callback(self.tier, self.scanned, self._total, sorted(self.open_ports))

    def start_tier(self, tier: str) -> None:
        self.tier = tier
        self.emit()

    def advance(self, count: int, opened: list[int]) -> None:
        self.scanned += count
        self.open_ports.extend(opened)
        if time.monotonic() - self._last >= self._interval:
            self.emit()


def sweep_tiers(
    address: str,
    ports: Sequence[int],
    *,
    timeout: float,
    concurrency: int,
    on_progress: TierProgress | None = None,
    shard_processes: int | None = None,
    progress_interval: float = PROGRESS_INTERVAL,
    stop: threading.Event | None = None,
) -> tuple[list[int], dict[int, Outcome]]:
    """Sweep ``ports`` of one literal address tier by tier; returns the distinct ports scanned,
    sorted, and the outcome of each that was not plainly refused (the rest were refused).

    A set ``stop`` ends the sweep early (within ~0.1 s); the outcomes are then incomplete.
    """
    check_address(address)
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
    return scanned, notable


def outcome_of(notable: dict[int, Outcome], port: int) -> Outcome:
    """A scanned port's (state, reason), refused unless ``notable`` says otherwise."""
    return notable.get(port, REFUSED)
