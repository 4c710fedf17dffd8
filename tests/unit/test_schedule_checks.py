"""What a schedule's run is checked against (check_schedule), and how its exclusions travel to
the worker (the payload's ``exclude``, TargetPolicy.excluding)."""

from __future__ import annotations

import ipaddress
from uuid import uuid4

import pytest
from pydantic import ValidationError

from shared.errors import TargetDenied
from shared.policy import TargetPolicy
from shared.schedules import ScheduleCreate, check_schedule
from shared.schemas import ScanConfig, ScanTaskPayload
from shared.settings import Settings

LOOPBACK = TargetPolicy(["127.0.0.0/8"], own=())


def spec(**changes: object) -> ScheduleCreate:
    return ScheduleCreate.model_validate(
        {"target": "127.0.0.1", "ports": "22", "cron": "0 3 * * *", **changes}
    )


async def test_the_per_scan_bounds_are_checked_by_counting_ports() -> None:
    settings = Settings(max_ports=1000, max_concurrency=600, max_hosts=4)
    assert await check_schedule(spec(ports="1-1000"), settings, LOOPBACK) is None
    over = await check_schedule(spec(ports="1-65535"), settings, LOOPBACK)
    assert over is not None
    assert (over.code, over.field) == ("invalid", "ports")
    assert "65535 ports" in over.reason
    busy = await check_schedule(spec(config={"max_concurrent": 1000}), settings, LOOPBACK)
    assert busy is not None
    assert busy.field == "config.max_concurrent"
    wide = await check_schedule(spec(target="127.0.0.0/24"), settings, LOOPBACK)
    assert wide is not None
    assert wide.field == "target"


async def test_a_run_its_rate_cannot_finish_in_time_is_refused_as_the_gateway_would() -> None:
    """65,535 ports at 10 probes/s (its own rate, or the workers' ceiling) take 6,554 s: every
    run would fail at its time limit."""
    settings = Settings(max_scan_seconds=1500)
    slow = await check_schedule(spec(ports="1-65535", config={"rate": 10}), settings, LOOPBACK)
    assert slow is not None
    assert (slow.code, slow.field) == ("invalid", "config.rate")
    ceiling = Settings(max_scan_seconds=1500, probe_rate_ceiling=10)
    capped = await check_schedule(spec(ports="1-65535"), ceiling, LOOPBACK)
    assert capped is not None
    assert "CYBERSEC_PROBE_RATE_CEILING" in capped.reason
    assert (
        await check_schedule(spec(ports="1-65535", config={"rate": 100}), settings, LOOPBACK)
        is None
    )


async def test_the_policy_and_the_exclusions_refuse() -> None:
    settings = Settings()
    denied = await check_schedule(spec(), settings, TargetPolicy(own=()))
    assert denied is not None
    assert denied.code == "target_denied"
    excluded = await check_schedule(spec(exclude=["127.0.0.0/30"]), settings, LOOPBACK)
    assert excluded is not None
    assert (excluded.code, excluded.field) == ("target_denied", "exclude")


def test_schedules_refuse_critical_priority() -> None:
    with pytest.raises(ValidationError, match="critical"):
        spec(priority="critical")


def payload(**changes: object) -> ScanTaskPayload:
    return ScanTaskPayload.model_validate(
        {
            "scan_id": str(uuid4()),
            "target": "example.com",
            "ports": "22",
            "config": ScanConfig().model_dump(mode="json"),
            "priority": "normal",
            **changes,
        }
    )


def test_a_payload_without_exclusions_is_the_version_1_message_it_was() -> None:
    plain = payload()
    assert plain.version == 1
    assert "exclude" not in plain.model_dump(mode="json")


def test_exclusions_need_payload_version_2_and_become_deny_entries() -> None:
    with pytest.raises(ValidationError, match="version 2"):
        payload(exclude=["10.0.0.0/8"])
    carried = payload(version=2, exclude=["10.0.0.0/8", "2001:db8::1"])
    assert ScanTaskPayload.model_validate(carried.model_dump(mode="json")) == carried
    policy = TargetPolicy(["10.0.0.0/8"], own=()).excluding(carried.exclude)
    with pytest.raises(TargetDenied):
        policy.check_address("10.1.2.3")
    with pytest.raises(TargetDenied):
        policy.check_address("::ffff:10.1.2.3")
    policy.check_address(ipaddress.ip_address("93.184.215.14"))
    plain = TargetPolicy(own=())
    assert plain.excluding(()) is plain
