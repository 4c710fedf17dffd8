"""Per-host timeouts, the token bucket, the scan's effective rate and discovery's defaults."""

from __future__ import annotations

import pytest

from shared.schemas import ScanConfig
from worker_service.probe.discovery import checksum, echo_request
from worker_service.probe.runner import ProbeLimits, discovery_wanted, effective_rate
from worker_service.probe.scheduler import WASTE_ALLOWANCE, HostStats
from worker_service.probe.timing import HostTiming, TokenBucket


def test_timeout_follows_the_round_trips_within_its_bounds() -> None:
    timing = HostTiming(high=1.0, low=0.1)
    assert timing.timeout == 1.0  # nothing measured yet: the configured maximum
    for _ in range(20):
        timing.sample(0.001)
    assert timing.timeout == 0.1  # a fast host still gets the floor
    for _ in range(20):
        timing.sample(0.2)
    assert 0.2 < timing.timeout < 1.0  # srtt + 4 x rttvar
    timing.sample(5.0)
    assert timing.timeout == 1.0  # never above config.timeout


def test_timing_restores_another_process_estimate() -> None:
    source = HostTiming(high=2.0, low=0.05)
    source.sample(0.3)
    copy = HostTiming(high=2.0, low=0.05)
    copy.restore(source.state)
    assert copy.timeout == source.timeout
    copy.restore((-1.0, 0.0))  # "no sample" changes nothing
    assert copy.timeout == source.timeout


def test_bucket_allows_a_burst_then_paces() -> None:
    bucket = TokenBucket(rate=100, now=0.0, burst=2)
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == 0.0
    assert bucket.take(0.0) == pytest.approx(0.01)
    assert bucket.take(0.005) == pytest.approx(0.005)
    assert bucket.take(0.01) == 0.0
    # Over a long stretch no more than rate x time (+ burst) is allowed.
    taken, now = 0, 0.01
    while now < 1.01:
        wait = bucket.take(now)
        if wait:
            now += wait
        else:
            taken += 1
    assert taken <= 100 + 2


def test_rate_is_the_scans_own_capped_by_the_worker_ceiling() -> None:
    assert effective_rate(ScanConfig(), ProbeLimits()) is None
    assert effective_rate(ScanConfig(rate=500), ProbeLimits()) == 500
    assert effective_rate(ScanConfig(rate=500), ProbeLimits(rate_ceiling=200)) == 200
    assert effective_rate(ScanConfig(), ProbeLimits(rate_ceiling=200)) == 200


def test_discovery_is_on_by_default_only_for_several_addresses() -> None:
    assert not discovery_wanted(ScanConfig(), ["198.19.0.1"])
    assert discovery_wanted(ScanConfig(), ["198.19.0.1", "198.19.0.2"])
    assert not discovery_wanted(ScanConfig(discovery=False), ["198.19.0.1", "198.19.0.2"])
    assert discovery_wanted(ScanConfig(discovery=True), ["198.19.0.1"])


def test_echo_request_carries_a_valid_checksum() -> None:
    packet = echo_request(0x1234, 7)
    assert packet[0] == 8
    assert checksum(packet) == 0


def test_retries_shrink_to_nmaps_bound_once_retransmissions_go_unanswered() -> None:
    stats = HostStats()
    assert stats.may_retry(0, 2)
    assert stats.may_retry(1, 2)  # within the allowance, every retry is sent
    assert not stats.may_retry(2, 2)
    stats.wasted = WASTE_ALLOWANCE
    assert stats.may_retry(0, 2)  # one retransmission always
    assert not stats.may_retry(1, 2)  # none answered beyond the first: no second
    stats.answer(1)
    assert stats.may_retry(1, 2)  # a first retransmission was answered: a second may be


def test_worker_settings_become_probe_limits() -> None:
    from shared.settings import Settings
    from worker_service.probe.runner import probe_limits

    assert probe_limits(Settings()).rate_ceiling is None  # 0: no ceiling
    limits = probe_limits(
        Settings(probe_rate_ceiling=300, probe_min_timeout=0.2, tarpit_min_open=5)
    )
    assert limits == ProbeLimits(rate_ceiling=300, min_timeout=0.2, tarpit_min_open=5)
