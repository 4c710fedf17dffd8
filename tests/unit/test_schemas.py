from __future__ import annotations

import pytest
from pydantic import ValidationError

from api_service.errors import ApiError
from api_service.requests import ParsedScan
from shared.schemas import ScanRequest
from shared.settings import Settings


def test_defaults_and_canonical_values() -> None:
    request = ScanRequest.model_validate({"target": " LOCALHOST. ", "ports": "81,80,82"})
    assert request.target == "localhost"
    assert request.ports == "80-82"
    assert request.priority == "normal"
    assert request.config.scan_type == "TCP"
    assert request.config.timeout == 1.0
    assert request.config.max_concurrent == 500


@pytest.mark.parametrize(
    "body",
    [
        {"target": "127.0.0.1", "extra": 1},
        {"target": "127.0.0.1", "config": {"timeout": 0}},
        {"target": "127.0.0.1", "config": {"timeout": 31}},
        {"target": "127.0.0.1", "config": {"max_concurrent": 0}},
        {"target": "127.0.0.1", "priority": "urgent"},
        {"target": "127.0.0.1", "ports": "80-20"},
    ],
)
def test_rejects(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ScanRequest.model_validate(body)


def test_the_configured_host_bound_applies_above_the_default() -> None:
    request = ScanRequest.model_validate({"target": "10.0.0.0/23", "ports": "80"})
    wide = ParsedScan(request, Settings(max_hosts=1024))
    assert wide.hosts == 510
    with pytest.raises(ApiError, match="the bound is 256") as refused:
        ParsedScan(request, Settings())
    assert refused.value.status == 422


def test_concurrency_setting_cannot_exceed_what_a_request_may_ask() -> None:
    with pytest.raises(ValidationError):
        Settings(max_concurrency=30_000)


def test_a_rate_too_low_for_the_time_bound_is_refused_naming_it() -> None:
    request = ScanRequest.model_validate(
        {"target": "127.0.0.1", "ports": "1-65535", "config": {"rate": 10}}
    )
    with pytest.raises(ApiError, match="the bound is 1500 s") as refused:
        ParsedScan(request, Settings(max_scan_seconds=1500))
    assert refused.value.status == 422
    assert refused.value.field == "config.rate"
    fast = request.model_copy(update={"config": request.config.model_copy(update={"rate": 100})})
    assert ParsedScan(fast, Settings(max_scan_seconds=1500)).port_count == 65535


def test_a_ceiling_too_low_for_the_time_bound_is_refused_naming_it() -> None:
    """No rate of its own, but the workers pace every scan to 10/s: 65,535 probes cannot end
    within 1500 s, and the answer says it is the ceiling."""
    request = ScanRequest.model_validate({"target": "127.0.0.1", "ports": "1-65535"})
    with pytest.raises(ApiError, match="CYBERSEC_PROBE_RATE_CEILING") as refused:
        ParsedScan(request, Settings(max_scan_seconds=1500, probe_rate_ceiling=10))
    assert refused.value.field == "config.rate"
    assert ParsedScan(request, Settings(probe_rate_ceiling=100)).port_count == 65535


def test_a_hard_limit_past_rabbitmqs_consumer_timeout_is_refused_at_start() -> None:
    assert Settings(max_scan_seconds=1500, hard_limit_margin=299).hard_limit_margin == 299
    with pytest.raises(ValidationError, match="consumer timeout"):
        Settings(max_scan_seconds=1500, hard_limit_margin=300)
    with pytest.raises(ValidationError, match="consumer timeout"):
        Settings(merge_time_limit=1790)  # the merge's hard limit too
    with pytest.raises(ValidationError):
        Settings(hard_limit_margin=5)  # no time left for the final writes
