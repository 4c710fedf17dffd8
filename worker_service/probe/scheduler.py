"""One epoll loop for many hosts: interleaved (address, port) probes, per-host adaptive
timeouts, retransmission of unanswered probes, and pacing by a probe rate.

Probes go out port-major (every live host's port ``p`` before any host's next port), so a slow
or silent host takes its share of the connects in flight and never serializes the rest. A probe
nobody answered within its host's current timeout is sent again, from a fresh socket, up to
``retries`` times (``HostStats.may_retry``) before its port is called filtered; retransmissions
go ahead of new probes.
Readiness is always collected before deadlines are checked and a socket whose deadline passed
is asked for a late answer, so a slow loop delays results but never turns an answer into
"filtered". Only C-level modules at run time, like ``sweep``.
"""

from __future__ import annotations

import _socket as socket
import errno
import select
import time
from _heapq import heappop, heappush

from worker_service.probe.sweep import (
    LINGER_RESET,
    LOCAL_SHORTAGE,
    MAX_INFLIGHT,
    POLL_CAP,
    REFUSED,
    classify_error,
    connected,
)
from worker_service.probe.timing import HostTiming

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from collections import deque
    from collections.abc import Callable, Iterator, Sequence
    from typing import Final

    from worker_service.probe.sweep import Outcome
    from worker_service.probe.timing import TokenBucket

    Pair = tuple[str, int]
    Tick = Callable[[int, list[Pair]], None]
    """Called with (probes finished since the last tick, (address, port) found open since)."""
else:
    from _collections import deque


WASTE_ALLOWANCE: Final = 64
"""Unanswered retransmissions a host may cost before nmap's retry bound applies to it: before
any retransmission was answered, a lossy network's first deep losses must still be retried."""


class HostStats:
    """What one host cost and answered: probes sent (retransmissions included), the
    retransmissions among them, and probes that got any answer."""

    __slots__ = ("answered", "best_attempt", "probes", "retransmissions", "srtt", "wasted")

    def __init__(self, probes: int = 0, retransmissions: int = 0, answered: int = 0) -> None:
        self.probes = probes
        self.retransmissions = retransmissions
        self.answered = answered
        self.best_attempt = 0
        """The highest retransmission (1 = the first) that ever got an answer."""
        self.wasted = 0
        """Retransmissions that went unanswered too."""
        self.srtt = -1.0
        """The host's smoothed RTT when the sweep ended (< 0: nothing answered)."""

    def answer(self, attempt: int) -> None:
        self.answered += 1
        if attempt > self.best_attempt:
            self.best_attempt = attempt

    def may_retry(self, attempt: int, retries: int) -> bool:
        """Whether an unanswered probe of this attempt is sent again: up to ``retries`` times;
        once ``WASTE_ALLOWANCE`` retransmissions of the host went unanswered, only one beyond
        the highest retransmission that ever got an answer (nmap's rule). A host that drops a
        port range for good then costs one retransmission per port, not ``retries``; where the
        network loses packets, answered retransmissions keep the bound up."""
        if attempt >= retries:
            return False
        return attempt <= self.best_attempt or self.wasted < WASTE_ALLOWANCE

    def add(self, other: HostStats) -> None:
        self.probes += other.probes
        self.retransmissions += other.retransmissions
        self.answered += other.answered

    def as_list(self) -> list[int]:
        return [self.probes, self.retransmissions, self.answered]


class Scheduler:
    """Probes (address, port) pairs of many hosts; keeps each host's timing and counts
    across calls to :meth:`run`, so later tiers start from what earlier ones measured."""

    def __init__(
        self,
        *,
        timeout: float,
        retries: int,
        inflight: int,
        min_timeout: float,
        bucket: TokenBucket | None = None,
        on_tick: Tick | None = None,
        tick_interval: float = 0.2,
        stop: threading.Event | None = None,
    ) -> None:
        self.timeout = timeout
        self.min_timeout = min_timeout
        self.retries = max(0, retries)
        self.inflight = max(1, min(inflight, MAX_INFLIGHT))
        self.bucket = bucket
        self.on_tick = on_tick
        self.tick_interval = tick_interval
        self.stop = stop
        self.timing: dict[str, HostTiming] = {}
        self.stats: dict[str, HostStats] = {}
        self.group = HostTiming(timeout, min_timeout)
        """Every host's samples together: the timeout of a host that has answered nothing
        yet (nmap's group timing), so a silent host costs what the network's RTT says."""

    def host(self, address: str, seed: tuple[float, float] | None = None) -> HostTiming:
        """The host's timing, created on first use (seeded, e.g. from discovery's RTT)."""
        timing = self.timing.get(address)
        if timing is None:
            timing = HostTiming(self.timeout, self.min_timeout, seed)
            if seed is not None and seed[0] >= 0:
                self.group.sample(seed[0])
            self.timing[address] = timing
            self.stats[address] = HostStats()
        return timing

    def run(self, hosts: Sequence[str], ports: Sequence[int]) -> dict[Pair, Outcome]:
        """Probe every port of every host; returns the outcome of each pair that was not
        plainly refused. A set ``stop`` ends early (within ~0.1 s), leaving it incomplete."""
        for address in hosts:
            self.host(address)
        pairs: Iterator[Pair] = ((address, port) for port in ports for address in hosts)
        return self._loop(pairs)

    def _loop(self, pairs: Iterator[Pair]) -> dict[Pair, Outcome]:
        timing, stats, bucket, stop = self.timing, self.stats, self.bucket, self.stop
        group = self.group
        retries, inflight, on_tick = self.retries, self.inflight, self.on_tick
        notable: dict[Pair, Outcome] = {}
        pending: dict[int, tuple[socket.socket, str, int, int, float]] = {}
        deadlines: list[tuple[float, int, socket.socket]] = []
        again: deque[tuple[str, int, int]] = deque()
        epoll = select.epoll(inflight)
        register = epoll.register
        monotonic = time.monotonic
        sock_type = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
        sol_socket, so_error = socket.SOL_SOCKET, socket.SO_ERROR
        in_progress, refused = errno.EINPROGRESS, errno.ECONNREFUSED
        epollout = select.EPOLLOUT
        seq = done = 0
        opened: list[Pair] = []
        next_tick = monotonic() + self.tick_interval
        pairs_left = True
        try:
            while True:
                if stop is not None and stop.is_set():
                    break
                paced = 0.0
                while len(pending) < inflight:
                    if again:
                        address, port, attempt = again.popleft()
                    elif pairs_left:
                        pair = next(pairs, None)
                        if pair is None:
                            pairs_left = False
                            break
                        address, port = pair
                        attempt = 0
                    else:
                        break
                    if bucket is not None:
                        paced = bucket.take(monotonic())
                        if paced:
                            again.appendleft((address, port, attempt))
                            break
                    host_stats = stats[address]
                    host_stats.probes += 1
                    if attempt:
                        host_stats.retransmissions += 1
                    family = socket.AF_INET6 if ":" in address else socket.AF_INET
                    sock: socket.socket | None = None
                    try:
                        fresh = socket.socket(family, sock_type)
                    except OSError as exc:  # no descriptor left: as a connect() shortage
                        if exc.errno not in LOCAL_SHORTAGE:
                            raise
                        code = exc.errno
                    else:
                        sock = fresh
                        sent = monotonic()
                        code = fresh.connect_ex((address, port))
                    if sock is not None and code == in_progress:
                        # Loopback answers inside connect() itself: an answer is already
                        # readable, which spares the epoll round trip for the bulk of a sweep.
                        # Reading SO_ERROR clears it, so any error read here decides at once.
                        early = sock.getsockopt(sol_socket, so_error)
                        if early == refused:
                            sock.close()
                            rtt = monotonic() - sent
                            timing[address].sample(rtt)
                            group.sample(rtt)
                            host_stats.answer(attempt)
                            done += 1
                            continue
                        if early:
                            sock.close()
                            host_stats.answer(attempt)
                            done += 1
                            notable[(address, port)] = classify_error(early)
                            continue
                        fd = sock.fileno()
                        pending[fd] = (sock, address, port, attempt, sent)
                        register(fd, epollout)
                        seq += 1
                        host_timing = timing[address]
                        if host_timing.srtt < 0:
                            host_timing = group
                        heappush(deadlines, (sent + host_timing.timeout, seq, sock))
                        continue
                    if code in LOCAL_SHORTAGE:
                        if sock is not None:
                            sock.close()
                        host_stats.probes -= 1
                        if attempt:
                            host_stats.retransmissions -= 1
                        if not pending:
                            raise OSError(code, f"cannot open a probe: {errno.errorcode[code]}")
                        again.appendleft((address, port, attempt))
                        break
                    assert sock is not None  # a socket() failure is a shortage or raised
                    outcome = connected(sock) if code == 0 else classify_error(code)
                    sock.close()
                    host_stats.answer(attempt)
                    done += 1
                    if outcome is not REFUSED:
                        notable[(address, port)] = outcome
                        if outcome[0] == "open":
                            opened.append((address, port))
                if not pending:
                    if paced:
                        time.sleep(paced)
                        continue
                    break
                wait = min(max(deadlines[0][0] - monotonic(), 0.0), POLL_CAP)
                if paced:
                    wait = min(wait, paced)
                events = epoll.poll(wait, inflight)
                now = monotonic()
                for fd, _events in events:
                    sock, address, port, attempt, sent = pending.pop(fd)
                    code = sock.getsockopt(sol_socket, so_error)
                    stats[address].answer(attempt)
                    if code == refused:
                        timing[address].sample(now - sent)
                        group.sample(now - sent)
                        sock.close()
                        done += 1
                        continue
                    if code:
                        outcome = classify_error(code)
                    else:
                        try:
                            outcome = connected(sock)
                        except OSError:  # ready, yet not connected: as at its deadline
                            outcome = ("filtered", "no-response")
                        else:
                            timing[address].sample(now - sent)
                            group.sample(now - sent)
                        if outcome[0] == "open":
                            opened.append((address, port))
                            sock.setsockopt(sol_socket, socket.SO_LINGER, LINGER_RESET)
                    notable[(address, port)] = outcome
                    sock.close()
                    done += 1
                while deadlines and deadlines[0][0] <= now:
                    sock = heappop(deadlines)[2]
                    fd = sock.fileno()
                    if fd == -1:
                        continue  # answered and closed already
                    sock, address, port, attempt, sent = pending.pop(fd)
                    code = sock.getsockopt(sol_socket, so_error)
                    if not code:
                        try:
                            outcome = connected(sock)
                        except OSError:
                            outcome = ("filtered", "no-response")
                    else:
                        outcome = classify_error(code)
                    if outcome[1] == "no-response" and attempt:
                        stats[address].wasted += 1
                    if outcome[1] == "no-response" and stats[address].may_retry(attempt, retries):
                        sock.close()
                        again.append((address, port, attempt + 1))
                        continue
                    if outcome[1] != "no-response":
                        stats[address].answer(attempt)
                    sock.close()
                    done += 1
                    if outcome is not REFUSED:
                        notable[(address, port)] = outcome
                        if outcome[0] == "open":
                            opened.append((address, port))
                if on_tick is not None and now >= next_tick:
                    on_tick(done, opened)
                    done, opened = 0, []
                    next_tick = now + self.tick_interval
            if on_tick is not None and (done or opened):
                on_tick(done, opened)
        finally:
            for entry in pending.values():
                entry[0].close()
            epoll.close()
        return notable
