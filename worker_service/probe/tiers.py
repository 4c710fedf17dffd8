"""The blocking scan core: tier by tier over many hosts, in this process or in probe processes.

``runner`` wraps it for the worker (discovery first, outcome records, an executor thread);
a one-shot scan command calls it directly. It imports only C-level standard modules at run
time (no ``typing``, ``socket``, ``re`` or ``collections``): a command that scans a thousand
loopback ports in ~20 ms would otherwise spend twice that importing.
"""

from __future__ import annotations

import os
import time
from _socket import AF_INET, AF_INET6, inet_pton
from resource import RLIMIT_NOFILE, getrlimit

from shared.ports import order_by_tier
from worker_service.probe.scheduler import HostStats, Scheduler
from worker_service.probe.sweep import REFUSED, ProbeJob, run_processes
from worker_service.probe.timing import MIN_TIMEOUT, TokenBucket

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Sequence
    from typing import Final

    from worker_service.probe.scheduler import Pair
    from worker_service.probe.sweep import Outcome

    TierProgress = Callable[[str, int, int, list[Pair]], None]
    """Called with (tier, probes finished, total probes, open (address, port) so far)."""
    TierDone = Callable[[str, dict[Pair, Outcome]], None]
    """Called after each tier with everything found so far."""

_RESERVED_FDS: Final = 64
PROBE_PROCESS_MIN_PAIRS: Final = 4096
"""Below this many probes in a tier, starting probe processes costs more than it saves."""
PROGRESS_INTERVAL: Final = 0.25
"""Seconds between progress events within a tier; a full-range scan emits a handful, not 65k."""


def effective_concurrency(requested: int) -> int:
    """The requested number of connects in flight, capped by the open-file limit."""
    soft, _hard = getrlimit(RLIMIT_NOFILE)
    return max(1, min(requested, soft - _RESERVED_FDS))


def probe_process_count(pairs: int, requested: int | None = None) -> int:
    """Processes to sweep a tier of this many probes with: one per CPU for large tiers."""
    if requested is not None:
        return max(1, min(requested, pairs))
    if pairs < PROBE_PROCESS_MIN_PAIRS:
        return 1
    cpus = len(os.sched_getaffinity(0)) or 1
    return max(1, min(cpus, pairs // (PROBE_PROCESS_MIN_PAIRS // 2)))


def check_address(address: str) -> None:
    """Raise ValueError unless ``address`` is a literal IPv4 or IPv6 address (hostnames are
    resolved by the caller); an IPv6 zone (``fe80::1%eth0``) is allowed."""
    literal = address.partition("%")[0]
    try:
        inet_pton(AF_INET6 if ":" in literal else AF_INET, literal)
    except OSError:
        raise ValueError(f"{address!r} is not an IP address") from None


class _Progress:
    """Counts finished probes; calls back at tier starts, at most every interval, and at the end."""

    def __init__(self, callback: TierProgress | None, total: int, interval: float) -> None:
        self._callback = callback
        self._total = total
        self._interval = interval
        self._last = 0.0
        self.tier = ""
        self.scanned = 0
        self.open_ports: list[Pair] = []

    def emit(self) -> None:
        self._last = time.monotonic()
        if self._callback is not None:
            self._callback(self.tier, self.scanned, self._total, sorted(self.open_ports))

    def start_tier(self, tier: str) -> None:
        self.tier = tier
        self.emit()

    def advance(self, count: int, opened: list[Pair]) -> None:
        self.scanned += count
        self.open_ports.extend(opened)
        if time.monotonic() - self._last >= self._interval:
            self.emit()


class Sweep:
    """How to probe: the knobs of one scan's port sweep."""

    def __init__(
        self,
        *,
        timeout: float,
        concurrency: int,
        retries: int = 0,
        rate: float | None = None,
        min_timeout: float = MIN_TIMEOUT,
        probe_processes: int | None = None,
        progress_interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.timeout = timeout
        self.concurrency = concurrency
        self.retries = retries
        self.rate = rate
        self.min_timeout = min_timeout
        self.probe_processes = probe_processes
        self.progress_interval = progress_interval


def sweep_tiers(
    hosts: Sequence[str],
    ports: Sequence[int],
    how: Sweep,
    *,
    seeds: dict[str, tuple[float, float]] | None = None,
    on_progress: TierProgress | None = None,
    on_tier: TierDone | None = None,
    stop: threading.Event | None = None,
) -> tuple[dict[Pair, Outcome], dict[str, HostStats]]:
    """Sweep ``ports`` of every literal address in ``hosts`` tier by tier, the hosts'
    probes interleaved; returns the outcome of each (address, port) that was not plainly
    refused (the rest were refused) and what each host cost.

    ``seeds`` start hosts' RTT estimates (from discovery). A set ``stop`` ends the sweep
    early (within ~0.1 s); the outcomes are then incomplete.
    """
    for address in hosts:
        check_address(address)
    tiers = order_by_tier(ports)
    total = sum(len(tier_ports) for _tier, tier_ports in tiers) * len(hosts)
    inflight = effective_concurrency(how.concurrency)
    progress = _Progress(on_progress, total, how.progress_interval)
    tick_interval = how.progress_interval / 2
    bucket = TokenBucket(how.rate, time.monotonic()) if how.rate else None
    scheduler = Scheduler(
        timeout=how.timeout,
        min_timeout=how.min_timeout,
        retries=how.retries,
        inflight=inflight,
        bucket=bucket,
        on_tick=progress.advance,
        tick_interval=tick_interval,
        stop=stop,
    )
    for address in hosts:
        scheduler.host(address, (seeds or {}).get(address))
    notable: dict[Pair, Outcome] = {}
    for tier, tier_ports in tiers:
        if stop is not None and stop.is_set():
            break
        progress.start_tier(tier)
        count = probe_process_count(len(tier_ports) * len(hosts), how.probe_processes)
        if count == 1:
            notable.update(scheduler.run(hosts, tier_ports))
        else:
            notable.update(_in_processes(scheduler, hosts, tier_ports, how, count, inflight))
        if on_tier is not None:
            on_tier(tier, notable)
    if tiers:
        progress.emit()
    for address, timing in scheduler.timing.items():
        scheduler.stats[address].srtt = timing.srtt
    return notable, scheduler.stats


def _in_processes(
    scheduler: Scheduler,
    hosts: Sequence[str],
    ports: Sequence[int],
    how: Sweep,
    count: int,
    inflight: int,
) -> dict[Pair, Outcome]:
    """One tier split over ``count`` probe processes: by host when there are enough hosts
    (each keeps whole hosts' timing), else by dealing the ports round-robin (a filtered range
    then slows every process a little, not one a lot)."""
    if len(hosts) >= count:
        slices = [(list(hosts[i::count]), (0, 1)) for i in range(count)]
    else:
        slices = [(list(hosts), (i, count)) for i in range(count)]
    seeds = {address: timing.state for address, timing in scheduler.timing.items()}
    jobs = [
        ProbeJob(
            share_hosts,
            ports,
            share=share,
            timeout=how.timeout,
            min_timeout=how.min_timeout,
            retries=how.retries,
            inflight=max(1, inflight // len(slices)),
            rate=how.rate / len(slices) if how.rate else None,
            seeds=seeds,
            tick=scheduler.tick_interval,
        )
        for share_hosts, share in slices
    ]
    result = run_processes(jobs, on_tick=scheduler.on_tick, stop=scheduler.stop)
    for address, counts in result.stats.items():
        scheduler.stats[address].add(HostStats(*counts))
    for address, state in result.timing.items():
        scheduler.host(address).restore(state)
    return result.notable


def outcome_of(notable: dict[Pair, Outcome], pair: Pair) -> Outcome:
    """A scanned pair's (state, reason), refused unless ``notable`` says otherwise."""
    return notable.get(pair, REFUSED)
