"""Per-host round-trip estimates, the probe timeout they give, and rate pacing.

The estimate is TCP's own (RFC 6298, as nmap's scan engine uses it): each answered connect
(open or refused) is one sample, timed from its own ``connect()``, so a retransmission never
gives an ambiguous sample (every retry is a fresh socket). Only C-level modules at run time.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Final

MIN_TIMEOUT: Final = 0.1
"""Shortest probe timeout however fast a host answers (nmap -T4's min-rtt-timeout)."""


class HostTiming:
    """One host's smoothed RTT and variance, and the timeout they give within [low, high]."""

    __slots__ = ("high", "low", "rttvar", "srtt", "timeout")

    def __init__(
        self, high: float, low: float = MIN_TIMEOUT, seed: tuple[float, float] | None = None
    ) -> None:
        self.high = high
        self.low = min(low, high)
        self.srtt = -1.0
        self.rttvar = 0.0
        self.timeout = high
        if seed is not None and seed[0] >= 0:
            self.srtt, self.rttvar = seed
            self._update()

    def sample(self, rtt: float) -> None:
        """Fold one measured round trip (seconds) into the estimate."""
        if self.srtt < 0:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar += (abs(rtt - self.srtt) - self.rttvar) / 4
            self.srtt += (rtt - self.srtt) / 8
        self._update()

    def _update(self) -> None:
        self.timeout = min(self.high, max(self.low, self.srtt + 4 * self.rttvar))

    def restore(self, state: tuple[float, float]) -> None:
        """Take over an estimate made elsewhere (a probe process's)."""
        if state[0] >= 0:
            self.srtt, self.rttvar = state
            self._update()

    @property
    def state(self) -> tuple[float, float]:
        """(srtt, rttvar), to seed another process's estimate; srtt < 0 means no sample yet."""
        return (self.srtt, self.rttvar)


_WHOLE: Final = 1.0 - 1e-9
"""A token, give or take float rounding: a wait of exactly the time to the next token must
then find it there, not a fraction short of it."""


class TokenBucket:
    """Probes per second with a small burst: ``take`` answers how long until one is allowed.

    The scheduler asks before each connect and, when told to wait, sleeps in its epoll wait
    (serving answers meanwhile) rather than in a sleep per probe.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 50)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> float:
        """Take one token and return 0.0, or return the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= _WHOLE:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate
