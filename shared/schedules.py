"""Recurring scans: the request and answer models, and when a schedule fires.

Cron expressions are matched on the schedule's local wall clock (croniter on naive times), then
placed on the time line with ``zoneinfo``:

- a wall time the clock skips (02:30 on a spring-forward night) fires once, at the first valid
  instant after the gap (03:00 local);
- a wall time the clock shows twice (01:30 on a fall-back night) fires once, at its first
  occurrence;
- two wall times that land on the same instant fire once.

Interval schedules count from their creation (or last timing edit) in plain UTC seconds.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.errors import ResolutionFailed, TargetDenied
from shared.policy import TargetPolicy, excluded_by
from shared.ports import PortSpecError, count_ports, parse_port_ranges
from shared.protocol import LimitPolicy, too_slow
from shared.resolve import resolve_target
from shared.schemas import Priority, ScanConfig, ScanRequest
from shared.settings import Settings
from shared.targets import TargetError, parse_target

MisfirePolicy = Literal["skip", "run_once"]
MIN_INTERVAL = 60
"""Shortest interval between two runs of an interval schedule, in seconds."""
MAX_CRON_STEPS = 2_000
"""Candidate wall times examined for one next run: far more than a year of DST quirks needs."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_cron(value: str) -> str:
    text = " ".join(value.split())
    if len(text.split(" ")) != 5 or not croniter.is_valid(text):
        raise ValueError("must be a 5-field cron expression, e.g. '30 2 * * *'")
    return text


@functools.cache
def _zone_names() -> frozenset[str]:
    return frozenset(available_timezones())


def _check_timezone(value: str) -> str:
    if value not in _zone_names():
        raise ValueError(f"{value!r} is not an IANA time zone such as 'Europe/Berlin'")
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not an IANA time zone") from None
    return value


def _check_exclude(values: list[str]) -> list[str]:
    out: list[str] = []
    for raw in values:
        try:
            out.append(str(ipaddress.ip_network(raw.strip(), strict=False)))
        except ValueError:
            raise ValueError(f"exclusion {raw!r} is not an address or CIDR block") from None
    return out


class ScheduleCreate(ScanRequest):
    """A scan request (target, ports, config, priority, validated as ``POST /api/scan`` does)
    with its timing."""

    name: str | None = Field(default=None, max_length=200)
    cron: str | None = Field(default=None, max_length=200, description="5-field cron expression")
    timezone: str = Field(default="UTC", max_length=64, description="IANA time zone of `cron`")
    interval_seconds: int | None = Field(default=None, ge=MIN_INTERVAL, le=366 * 86_400)
    enabled: bool = True
    misfire_policy: MisfirePolicy = "skip"
    misfire_grace_seconds: int = Field(default=300, ge=1, le=7 * 86_400)
    exclude: list[str] = Field(default_factory=list, max_length=256)

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return None if value is None else _check_cron(value)

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, value: str) -> str:
        return _check_timezone(value)

    @field_validator("exclude")
    @classmethod
    def _exclude(cls, value: list[str]) -> list[str]:
        return _check_exclude(value)

    @field_validator("priority")
    @classmethod
    def _not_critical(cls, value: Priority) -> Priority:
        # Critical scans jump every queue and a key has only a share of them a minute; a
        # timed run cannot wait for that share, so schedules run at high priority at most.
        if value == "critical":
            raise ValueError("schedules run at high priority at most, not critical")
        return value

    @model_validator(mode="after")
    def _one_timing(self) -> ScheduleCreate:
        if (self.cron is None) == (self.interval_seconds is None):
            raise ValueError("give exactly one of cron and interval_seconds")
        if self.force:
            raise ValueError("force: a schedule's runs never answer from the result cache")
        if self.cron is not None:
            try:
                Timing(cron=self.cron, timezone=self.timezone).next_after(datetime.now(UTC))
            except ValueError:
                raise ValueError(f"cron: {self.cron!r} matches no date") from None
        return self


class ScheduleUpdate(_Strict):
    """PATCH body: only the fields given change; the merged schedule is validated as a
    :class:`ScheduleCreate`."""

    name: str | None = Field(default=None, max_length=200)
    target: str | None = Field(default=None, max_length=255)
    ports: str | None = Field(default=None, max_length=4096)
    config: ScanConfig | None = None
    priority: Priority | None = None
    cron: str | None = Field(default=None, max_length=200)
    timezone: str | None = Field(default=None, max_length=64)
    interval_seconds: int | None = Field(default=None, ge=MIN_INTERVAL, le=366 * 86_400)
    enabled: bool | None = None
    misfire_policy: MisfirePolicy | None = None
    misfire_grace_seconds: int | None = Field(default=None, ge=1, le=7 * 86_400)
    exclude: list[str] | None = Field(default=None, max_length=256)


TIMING_FIELDS = frozenset({"cron", "timezone", "interval_seconds", "enabled"})
"""Fields whose change recomputes ``next_run_at`` from the moment of the edit."""


class Schedule(_Strict):
    id: UUID
    name: str | None
    target: str
    ports: str
    config: ScanConfig
    priority: Priority
    cron: str | None
    timezone: str
    interval_seconds: int | None
    enabled: bool
    misfire_policy: MisfirePolicy
    misfire_grace_seconds: int
    exclude: list[str]
    next_run_at: datetime | None
    parked_reason: str | None = None
    """Why the dispatcher stopped firing this schedule (an edit clears it), or None."""
    last_run_at: datetime | None
    created_at: datetime
    updated_at: datetime


class ScheduleList(_Strict):
    items: list[Schedule]


class ScheduleRun(_Strict):
    """Answer to run-now: the scan it created."""

    schedule_id: UUID
    task_id: UUID
    scan_id: UUID
    scheduled_for: datetime
    status: Literal["queued"] = "queued"


# --- when it fires -----------------------------------------------------------------------


class Timing:
    """A schedule's timing fields, enough to find its next run."""

    def __init__(
        self, *, cron: str | None, timezone: str = "UTC", interval_seconds: int | None = None
    ) -> None:
        if (cron is None) == (interval_seconds is None):
            raise ValueError("exactly one of cron and interval_seconds")
        self.cron = cron
        self.zone = ZoneInfo(timezone)
        self.interval = timedelta(seconds=interval_seconds) if interval_seconds else None

    def next_after(self, after: datetime, *, anchor: datetime | None = None) -> datetime:
        """The first run strictly after ``after`` (aware), in UTC. ``anchor``: where an
        interval schedule's runs are counted from (defaults to ``after``)."""
        after = after.astimezone(UTC)
        if self.interval is not None:
            start = (anchor or after).astimezone(UTC)
            if start > after:
                return start
            steps = (after - start) // self.interval + 1
            return start + steps * self.interval
        assert self.cron is not None
        local = after.astimezone(self.zone).replace(tzinfo=None)
        # Start an hour early: after a fall-back, the wall clock reads an hour behind the
        # first pass, and a wall time of that first pass may not have fired yet.
        candidates = croniter(self.cron, local - timedelta(hours=1))
        for _ in range(MAX_CRON_STEPS):
            wall = candidates.get_next(datetime)
            instant = self.to_instant(wall)
            if instant > after:
                return instant
        raise ValueError(f"cron {self.cron!r} has no run within {MAX_CRON_STEPS} steps")

    def last_at_or_before(self, moment: datetime) -> datetime | None:
        """The latest cron run at or before ``moment``, in UTC (None if none in reach)."""
        assert self.cron is not None
        local = moment.astimezone(self.zone).replace(tzinfo=None)
        # Walk wall times back from an hour later: after a fall-back the clock reads an hour
        # behind the first pass. Instants never decrease as wall times increase, so the first
        # one at or before ``moment`` is the latest.
        candidates = croniter(self.cron, local + timedelta(hours=1, minutes=1))
        for _ in range(MAX_CRON_STEPS):
            instant = self.to_instant(candidates.get_prev(datetime))
            if instant <= moment:
                return instant
        return None

    def to_instant(self, wall: datetime) -> datetime:
        """A local wall time on the time line (UTC): the first occurrence of a repeated time,
        the end of the gap for a skipped one."""
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        if first.astimezone(self.zone).replace(tzinfo=None) == wall:
            return first
        # Skipped: fold=1 reads it with the offset after the change, which lands before the
        # change; fold=0 with the offset before it, which lands after. The change lies between.
        low = wall.replace(tzinfo=self.zone, fold=1).astimezone(UTC)
        high = first
        if low > high:
            low, high = high, low
        while high - low > timedelta(seconds=1):
            middle = low + (high - low) / 2
            if self._offset(middle) == self._offset(high):
                high = middle
            else:
                low = middle
        whole = high.replace(microsecond=0)
        return whole if self._offset(whole) == self._offset(high) else high

    def _offset(self, instant: datetime) -> timedelta | None:
        return instant.astimezone(self.zone).utcoffset()


Decision = Literal["fire", "skip"]


def misfire_decision(
    due: datetime, now: datetime, policy: MisfirePolicy, grace_seconds: int
) -> Decision:
    """Whether a run due at ``due`` still fires at ``now``.

    Late by at most the grace period, every policy fires it (the dispatcher was busy or
    restarting). Later than that, ``skip`` drops it and ``run_once`` fires it; either way the
    runs missed in between collapse into at most this one."""
    if now - due <= timedelta(seconds=grace_seconds):
        return "fire"
    return "fire" if policy == "run_once" else "skip"


def latest_due(timing: Timing, due: datetime, now: datetime, anchor: datetime) -> datetime:
    """The last run time at or before ``now``, and not before the stored ``due`` one."""
    if timing.interval is not None:
        start = anchor.astimezone(UTC)
        if now < start:
            return due
        return max(due, start + ((now - start) // timing.interval) * timing.interval)
    last = timing.last_at_or_before(now)
    return due if last is None else max(due, last)


@dataclass(frozen=True, slots=True)
class TickPlan:
    fire_at: datetime | None
    """The run to record now (its ``scheduled_for``), or None when nothing fires."""
    next_run_at: datetime


def plan_tick(
    timing: Timing,
    due: datetime,
    now: datetime,
    *,
    anchor: datetime,
    policy: MisfirePolicy,
    grace_seconds: int,
) -> TickPlan:
    """What a dispatcher does at ``now`` with a schedule whose stored next run is ``due``."""
    latest = latest_due(timing, due, now, anchor)
    fire = misfire_decision(latest, now, policy, grace_seconds) == "fire"
    return TickPlan(latest if fire else None, timing.next_after(now, anchor=anchor))


# --- may it run ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a schedule (or one of its runs) may not go ahead."""

    reason: str
    code: Literal["invalid", "target_denied", "unresolvable_target"]
    field: str | None = None
    transient: bool = False
    """A resolution that failed now and may succeed on a later try."""


async def check_schedule(
    schedule: Schedule | ScheduleCreate,
    settings: Settings,
    policy: TargetPolicy,
    *,
    lookups: asyncio.Semaphore | None = None,
) -> Refusal | None:
    """The per-scan bounds (ports, hosts, concurrency), the target policy and the schedule's
    exclusions, as ``POST /api/scan`` applies them: checked when a schedule is written and
    again when each run fires. Ports are counted, never expanded."""
    try:
        port_count = count_ports(parse_port_ranges(schedule.ports))
    except PortSpecError as exc:
        return Refusal(str(exc), "invalid", "ports")
    if port_count > settings.max_ports:
        bound = settings.max_ports
        return Refusal(f"{port_count} ports requested; the bound is {bound}", "invalid", "ports")
    if schedule.config.max_concurrent > settings.max_concurrency:
        return Refusal(
            f"max_concurrent {schedule.config.max_concurrent} is over the bound "
            f"{settings.max_concurrency}",
            "invalid",
            "config.max_concurrent",
        )
    try:
        target = parse_target(schedule.target, max_hosts=settings.max_hosts)
        addresses = await resolve_target(
            target, policy, timeout=settings.resolve_timeout, lookups=lookups
        )
    except TargetError as exc:
        return Refusal(str(exc), "invalid", "target")
    except TargetDenied:
        # Neither the address nor the rule: both would map the network for whoever asks.
        return Refusal(f"{schedule.target} is not allowed by the target policy", "target_denied")
    except ResolutionFailed as exc:
        return Refusal(str(exc), "unresolvable_target", "target", transient=True)
    hosts = len(addresses) if target.kind == "network" else 1
    slow = too_slow(port_count, hosts, schedule.config.rate, LimitPolicy.of(settings))
    if slow is not None:
        return Refusal(slow, "invalid", "config.rate")
    return _excluded(schedule, addresses)


def _excluded(schedule: Schedule | ScheduleCreate, addresses: Sequence[str]) -> Refusal | None:
    if not schedule.exclude:
        return None
    for address in addresses:
        matched = excluded_by(ipaddress.ip_address(address), schedule.exclude)
        if matched is not None:
            return Refusal(
                f"{schedule.target} is inside the schedule's exclusion {matched}",
                "target_denied",
                "exclude",
            )
    return None
