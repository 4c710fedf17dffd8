"""The scan engine as the worker uses it: discovery, then every host's ports interleaved.

``tiers`` sweeps tier by tier with the epoll loop of ``scheduler``, in the calling thread for
small tiers or in one probe process per CPU for large ones. ``scan_hosts`` runs the whole
blocking scan in an executor thread (or inline for a scan that cannot block the loop long,
unless the loop is shared by many scans: ``ProbeLimits.inline``); the event loop only receives
throttled progress and the outcomes.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from resource import RLIMIT_NOFILE, getrlimit
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

from shared.ports import order_by_tier
from worker_service.probe.discovery import HostState, discover
from worker_service.probe.tiers import (
    PROGRESS_INTERVAL,
    Sweep,
    effective_concurrency,
    outcome_of,
    sweep_tiers,
)
from worker_service.probe.timing import MIN_TIMEOUT, TokenBucket

if TYPE_CHECKING:
    from shared.schemas import PortState
    from shared.settings import Settings
    from worker_service.probe.scheduler import HostStats, Pair
    from worker_service.probe.sweep import Outcome


class ProbeConfig(Protocol):
    """What the engine reads of a scan's config (``shared.schemas.ScanConfig`` is one); the
    engine itself never needs pydantic, so a probe command starts without it."""

    @property
    def timeout(self) -> float: ...
    @property
    def max_concurrent(self) -> int: ...
    @property
    def retries(self) -> int: ...
    @property
    def rate(self) -> int | None: ...
    @property
    def discovery(self) -> bool | None: ...


class Probing(NamedTuple):
    """A ``ProbeConfig`` for callers without a ``ScanConfig``."""

    timeout: float
    max_concurrent: int
    retries: int = 0
    rate: int | None = None
    discovery: bool | None = False


class PortOutcome(NamedTuple):
    port: int
    state: PortState
    reason: str


class ScanProgressEvent(NamedTuple):
    tier: str
    ports_scanned: int
    total_ports: int
    open_ports: list[int]
    open_pairs: Sequence[tuple[str, int]] = ()
    """(address, port) found open so far, for scans of several addresses."""


ProgressCallback = Callable[[ScanProgressEvent], None]


def by_address(event: ScanProgressEvent) -> list[tuple[str | None, ScanProgressEvent]]:
    """The event as one event per address with open ports (each listing that address's),
    for reporters that follow one address at a time; ``(None, event)`` while none is open."""
    addresses = sorted({address for address, _port in event.open_pairs})
    if not addresses:
        return [(None, event)]
    return [
        (address, event._replace(open_ports=[p for a, p in event.open_pairs if a == address]))
        for address in addresses
    ]


INLINE_MAX_PORTS = 16
INLINE_MAX_SECONDS = 3.0
"""A one-address scan of at most 16 ports whose probes (retransmissions included) cannot take
longer than 3 s sweeps on the loop's own thread: the executor round trip would cost a 1-port
scan more than the sweep does. The loop has nothing else to serve meanwhile but the cancel
check, which then waits at most that long."""


class ProbeLimits(NamedTuple):
    """What the worker's settings impose on every scan's probing."""

    rate_ceiling: float | None = None
    """Most probes per second of any one scan on this worker (None: no ceiling)."""
    min_timeout: float = MIN_TIMEOUT
    tarpit_min_open: int = 16
    """A host with at least this many open ports, and open on 90% of the ports probed so far,
    is a tarpit: flagged, and its services are not identified."""
    probe_processes: int | None = None
    inline: bool = True
    """Whether a short scan (``runs_inline``) may sweep on the event loop's own thread: not
    when that loop is shared by the scans of a threads-pool worker."""
    max_inflight: int | None = None
    """Most connects in flight for one scan whatever its ``max_concurrent``: a threads-pool
    process's scans share its open-file limit."""


class HostReport(NamedTuple):
    address: str
    up: bool
    reason: str
    """syn-ack, reset or echo-reply when up; no-response (or an ICMP error) when down;
    user-set when discovery was off."""
    rtt: float | None
    """Smoothed round trip in seconds, when anything answered."""
    probes: int
    retransmissions: int
    unresponsive: bool
    """Up, yet not one port probe got an answer (a filtering host, or the link went away)."""
    tarpit: bool


class HostsResult(NamedTuple):
    hosts: list[HostReport]
    outcomes: dict[str, list[PortOutcome]]
    """One outcome per port, sorted, for each address that was swept (up hosts only)."""

    @property
    def probes(self) -> int:
        return sum(host.probes for host in self.hosts)

    @property
    def retransmissions(self) -> int:
        return sum(host.retransmissions for host in self.hosts)

    @property
    def scanned(self) -> int:
        return sum(len(outcomes) for outcomes in self.outcomes.values())


def probe_limits(settings: Settings) -> ProbeLimits:
    """The worker settings' limits on probing: ``CYBERSEC_PROBE_RATE_CEILING`` caps every
    scan's rate (a node running N scans sends at most N times it)."""
    shared = settings.worker_pool == "threads"
    return ProbeLimits(
        rate_ceiling=settings.probe_rate_ceiling or None,
        min_timeout=settings.probe_min_timeout,
        tarpit_min_open=settings.tarpit_min_open,
        inline=not shared,
        max_inflight=open_files_share(settings.worker_concurrency) if shared else None,
    )


PROCESS_FDS = 256
"""Descriptors a threads-pool process keeps for itself: pools, Redis, pipes, logs."""


def open_files_share(scans: int) -> int:
    """Connects in flight each of ``scans`` scans of one process may hold."""
    soft, _hard = getrlimit(RLIMIT_NOFILE)
    return max(1, (soft - PROCESS_FDS) // max(1, scans))


def _inflight(config: ProbeConfig, limits: ProbeLimits) -> int:
    wanted = config.max_concurrent
    if limits.max_inflight is not None:
        wanted = min(wanted, limits.max_inflight)
    return effective_concurrency(wanted)


def hosts_results(found: HostsResult | None) -> dict[str, Any]:
    """The host-level fields of a ``ScanResult``, from what the engine found."""
    from shared.schemas import HostResult  # the worker's, not the engine's, dependency

    if found is None:
        return {}
    hosts = [
        HostResult(
            address=host.address,
            state="up" if host.up else "down",
            reason=host.reason,
            rtt_ms=round(host.rtt * 1000, 3) if host.rtt is not None else None,
            probes=host.probes,
            retransmissions=host.retransmissions,
            unresponsive=host.unresponsive,
            tarpit=host.tarpit,
        )
        for host in found.hosts
    ]
    return {
        "hosts": hosts,
        "probes_sent": found.probes,
        "retransmissions": found.retransmissions,
    }


def effective_rate(config: ProbeConfig, limits: ProbeLimits) -> float | None:
    """Probes per second for this scan: its own ``rate``, capped by the worker's ceiling."""
    rates = [r for r in (config.rate, limits.rate_ceiling) if r]
    return min(rates) if rates else None


def discovery_wanted(config: ProbeConfig, addresses: Sequence[str]) -> bool:
    """``config.discovery``, or by default on for a target of several addresses (nmap's
    behaviour; ``discovery: false`` is its ``-Pn``)."""
    return config.discovery if config.discovery is not None else len(addresses) > 1


class _Tarpits:
    """Flags hosts that answer on (nearly) every port, checked after each tier."""

    def __init__(self, ports: Sequence[int], min_open: int) -> None:
        self.sizes = {tier: len(tier_ports) for tier, tier_ports in order_by_tier(ports)}
        self.min_open = min_open
        self.flagged: set[str] = set()
        self.scanned = 0

    def after_tier(self, tier: str, notable: dict[Pair, Outcome]) -> None:
        self.scanned += self.sizes[tier]
        opened: dict[str, int] = {}
        for (address, _port), (state, _reason) in notable.items():
            if state == "open":
                opened[address] = opened.get(address, 0) + 1
        for address, count in opened.items():
            if count >= self.min_open and count * 10 >= self.scanned * 9:
                self.flagged.add(address)


def _min_timeout(config: ProbeConfig, limits: ProbeLimits) -> float:
    # A timeout shorter than config.timeout is only safe with a retransmission behind it.
    return limits.min_timeout if config.retries else config.timeout


def discover_blocking(
    addresses: Sequence[str],
    config: ProbeConfig,
    *,
    limits: ProbeLimits = ProbeLimits(),  # noqa: B008 - an immutable NamedTuple
    stop: threading.Event | None = None,
) -> dict[str, HostState]:
    """Which of ``addresses`` are up (every one, ``user-set``, when discovery is off)."""
    if not discovery_wanted(config, addresses):
        return {address: HostState(True, "user-set") for address in addresses}
    rate = effective_rate(config, limits)
    return discover(
        addresses,
        timeout=config.timeout,
        retries=config.retries,
        inflight=_inflight(config, limits),
        min_timeout=_min_timeout(config, limits),
        bucket=TokenBucket(rate, time.monotonic()) if rate else None,
        stop=stop,
    )


async def discover_hosts(
    addresses: Sequence[str],
    config: ProbeConfig,
    *,
    limits: ProbeLimits = ProbeLimits(),  # noqa: B008 - an immutable NamedTuple
) -> dict[str, HostState]:
    """``discover_blocking`` in an executor thread; cancelling it stops the pings."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    job = functools.partial(discover_blocking, addresses, config, limits=limits, stop=stop)
    try:
        return await loop.run_in_executor(None, job)
    finally:
        stop.set()


def scan_hosts_blocking(
    addresses: Sequence[str],
    ports: Sequence[int],
    config: ProbeConfig,
    *,
    limits: ProbeLimits = ProbeLimits(),  # noqa: B008 - an immutable NamedTuple
    on_progress: ProgressCallback | None = None,
    progress_interval: float = PROGRESS_INTERVAL,
    stop: threading.Event | None = None,
    known: Mapping[str, HostState] | None = None,
) -> HostsResult:
    """``scan_hosts`` without the event loop: blocks the calling thread, calls back in it."""

    rate = effective_rate(config, limits)
    concurrency = _inflight(config, limits)
    min_timeout = _min_timeout(config, limits)
    states = (
        dict(known)
        if known is not None
        else discover_blocking(addresses, config, limits=limits, stop=stop)
    )
    live = [address for address in addresses if states[address].up]
    seeds = {a: s.seed for a, s in states.items() if s.seed is not None}
    tier_progress = None
    if on_progress is not None:
        callback = on_progress

        def tier_progress(tier: str, scanned: int, total: int, open_pairs: list[Pair]) -> None:
            ports_only = sorted({port for _address, port in open_pairs})
            callback(ScanProgressEvent(tier, scanned, total, ports_only, open_pairs))

    tarpits = _Tarpits(ports, limits.tarpit_min_open)
    how = Sweep(
        timeout=config.timeout,
        concurrency=concurrency,
        retries=config.retries,
        rate=rate,
        min_timeout=min_timeout,
        probe_processes=limits.probe_processes,
        progress_interval=progress_interval,
    )
    notable, stats = sweep_tiers(
        live,
        ports,
        how,
        seeds=seeds,
        on_progress=tier_progress,
        on_tier=tarpits.after_tier,
        stop=stop,
    )
    scanned = sorted(set(ports))
    outcomes = {
        address: [_outcome(port, outcome_of(notable, (address, port))) for port in scanned]
        for address in live
    }
    reports = [
        _report(address, states[address], stats.get(address), address in tarpits.flagged)
        for address in addresses
    ]
    return HostsResult(reports, outcomes)


def _report(address: str, state: HostState, stats: HostStats | None, tarpit: bool) -> HostReport:
    rtt = state.seed[0] if state.seed is not None else None
    if stats is not None and stats.srtt >= 0:
        rtt = stats.srtt
    if stats is None:
        return HostReport(address, state.up, state.reason, rtt, 0, 0, False, False)
    return HostReport(
        address,
        state.up,
        state.reason,
        rtt,
        stats.probes,
        stats.retransmissions,
        stats.probes > 0 and stats.answered == 0,
        tarpit,
    )


def _outcome(port: int, outcome: tuple[str, str]) -> PortOutcome:
    return PortOutcome(port, cast("PortState", outcome[0]), outcome[1])


def runs_inline(
    addresses: Sequence[str],
    ports: Sequence[int],
    config: ProbeConfig,
    limits: ProbeLimits = ProbeLimits(),  # noqa: B008 - an immutable NamedTuple
) -> bool:
    """Whether the scan is short enough, at worst, to run on the event loop's thread: one
    address, few ports, no pacing (a rate sleeps between probes) and no discovery (its echoes
    and pings are a round of their own), so the loop is never held past the bound."""
    if effective_rate(config, limits) is not None or discovery_wanted(config, addresses):
        return False
    rounds = -(-len(ports) // max(1, min(config.max_concurrent, len(ports))))
    worst = rounds * config.timeout * (1 + config.retries)
    return len(addresses) == 1 and len(ports) <= INLINE_MAX_PORTS and worst <= INLINE_MAX_SECONDS


async def scan_hosts(
    addresses: Sequence[str],
    ports: Sequence[int],
    config: ProbeConfig,
    on_progress: ProgressCallback | None = None,
    *,
    limits: ProbeLimits = ProbeLimits(),  # noqa: B008 - an immutable NamedTuple
    progress_interval: float = PROGRESS_INTERVAL,
    known: Mapping[str, HostState] | None = None,
) -> HostsResult:
    """Discover which of ``addresses`` (literal IPs) are up (or take ``known``, discovery's
    answer already given, for every address), then probe every port of the
    live ones, tier by tier (a tier's first probes all go out before the next tier's), the
    hosts' probes interleaved, each host's timeout adapted to its measured round trips,
    unanswered probes sent again ``config.retries`` times, paced to ``config.rate`` capped by
    ``limits.rate_ceiling``.

    ``on_progress`` runs on the event loop's thread at each tier start, at most every
    ``progress_interval`` seconds within a tier, and once at the end. Cancelling the call
    stops the probe thread and probe processes within ~0.1 s.
    """
    if limits.inline and runs_inline(addresses, ports, config, limits):
        return scan_hosts_blocking(
            addresses, ports, config, limits=limits, on_progress=on_progress, known=known
        )
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    forward: ProgressCallback | None = None
    if on_progress is not None:
        callback = on_progress

        def forward(event: ScanProgressEvent) -> None:
            loop.call_soon_threadsafe(callback, event)

    job = functools.partial(
        scan_hosts_blocking,
        addresses,
        ports,
        config,
        limits=limits,
        on_progress=forward,
        progress_interval=progress_interval,
        stop=stop,
        known=known,
    )
    try:
        return await loop.run_in_executor(None, job)
    finally:
        stop.set()  # a cancelled scan's thread and probe processes end within ~0.1 s


async def scan_host(
    address: str,
    ports: Sequence[int],
    *,
    timeout: float,
    concurrency: int,
    retries: int = 0,
    on_progress: ProgressCallback | None = None,
    probe_processes: int | None = None,
    progress_interval: float = PROGRESS_INTERVAL,
) -> list[PortOutcome]:
    """Probe every port of one literal address, no discovery; one outcome per distinct port,
    sorted by port. ``scan_hosts`` for callers that deal in one address at a time."""
    config = Probing(timeout, concurrency, retries)
    limits = ProbeLimits(probe_processes=probe_processes)
    found = await scan_hosts(
        [address],
        ports,
        config,
        on_progress,
        limits=limits,
        progress_interval=progress_interval,
    )
    return found.outcomes.get(address, [])
