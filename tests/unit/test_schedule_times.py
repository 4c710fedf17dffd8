"""When schedules fire: DST gaps and repeats, a dispatcher that was down, misfire policies.

A dispatcher is simulated by calling ``plan_tick`` once a minute with explicit times; the
database side (locks, uniqueness, edits) is in tests/integration/test_schedules.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.schedules import MisfirePolicy, ScheduleCreate, Timing, plan_tick

MINUTE = timedelta(minutes=1)


def simulate(
    timing: Timing,
    start: datetime,
    end: datetime,
    *,
    policy: MisfirePolicy = "skip",
    grace: int = 300,
    down: tuple[datetime, datetime] | None = None,
) -> list[tuple[datetime, datetime]]:
    """(tick time, scheduled_for) of every run a once-a-minute dispatcher records."""
    due = timing.next_after(start, anchor=start)
    fired: list[tuple[datetime, datetime]] = []
    now = start
    while now <= end:
        stopped = down is not None and down[0] <= now < down[1]
        if not stopped and due <= now:
            plan = plan_tick(timing, due, now, anchor=start, policy=policy, grace_seconds=grace)
            if plan.fire_at is not None:
                fired.append((now, plan.fire_at))
            due = plan.next_run_at
        now += MINUTE
    return fired


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def test_a_skipped_0230_runs_once_at_the_end_of_the_gap() -> None:
    # Europe/Berlin, 2026-03-29: 02:00 CET becomes 03:00 CEST; 02:30 never shows on the clock.
    timing = Timing(cron="30 2 * * *", timezone="Europe/Berlin")
    fired = [when for _, when in simulate(timing, utc(2026, 3, 28, 0), utc(2026, 3, 30, 12))]
    local = [when.astimezone(timing.zone) for when in fired]
    assert [t.strftime("%m-%d %H:%M %Z") for t in local] == [
        "03-28 02:30 CET",
        "03-29 03:00 CEST",  # the first valid instant after the gap: 01:00 UTC
        "03-30 02:30 CEST",
    ]
    assert fired[1] == utc(2026, 3, 29, 1)


def test_a_repeated_0130_runs_once_at_its_first_occurrence() -> None:
    # America/New_York, 2026-11-01: 02:00 EDT goes back to 01:00 EST; 01:30 happens twice.
    timing = Timing(cron="30 1 * * *", timezone="America/New_York")
    fired = [when for _, when in simulate(timing, utc(2026, 10, 31, 12), utc(2026, 11, 2, 12))]
    assert fired == [utc(2026, 11, 1, 5, 30), utc(2026, 11, 2, 6, 30)]  # 01:30 EDT, 01:30 EST


def test_an_hourly_schedule_across_the_repeat_fires_once_per_wall_time() -> None:
    timing = Timing(cron="30 * * * *", timezone="America/New_York")
    fired = [when for _, when in simulate(timing, utc(2026, 11, 1, 4), utc(2026, 11, 1, 9, 30))]
    local = [when.astimezone(timing.zone).strftime("%H:%M") for when in fired]
    assert local == ["00:30", "01:30", "02:30", "03:30", "04:30"]
    assert len(set(fired)) == len(fired)


def test_dispatcher_down_three_hours_with_skip_runs_nothing_missed() -> None:
    timing = Timing(cron="0 * * * *")
    down = (utc(2026, 6, 1, 0, 30), utc(2026, 6, 1, 3, 30))
    fired = simulate(timing, utc(2026, 6, 1, 0), utc(2026, 6, 1, 5), down=down, policy="skip")
    assert [when for _, when in fired] == [utc(2026, 6, 1, 4), utc(2026, 6, 1, 5)]


def test_dispatcher_down_three_hours_with_run_once_catches_up_once() -> None:
    timing = Timing(cron="0 * * * *")
    down = (utc(2026, 6, 1, 0, 30), utc(2026, 6, 1, 3, 30))
    fired = simulate(timing, utc(2026, 6, 1, 0), utc(2026, 6, 1, 5), down=down, policy="run_once")
    # 01:00, 02:00 and 03:00 were missed: one run at restart, for the latest of them.
    assert fired == [
        (utc(2026, 6, 1, 3, 30), utc(2026, 6, 1, 3)),
        (utc(2026, 6, 1, 4), utc(2026, 6, 1, 4)),
        (utc(2026, 6, 1, 5), utc(2026, 6, 1, 5)),
    ]


@pytest.mark.parametrize(("policy", "expected"), [("skip", 0), ("run_once", 1)])
def test_a_nightly_run_missed_while_down(policy: MisfirePolicy, expected: int) -> None:
    timing = Timing(cron="30 2 * * *", timezone="Europe/Berlin")
    # Down from 01:00 to 04:00 local (CEST) on 2026-06-02: the 02:30 run falls inside.
    down = (utc(2026, 6, 1, 23), utc(2026, 6, 2, 2))
    fired = simulate(timing, utc(2026, 6, 1, 12), utc(2026, 6, 2, 12), down=down, policy=policy)
    assert len(fired) == expected
    if fired:
        assert fired[0] == (utc(2026, 6, 2, 2), utc(2026, 6, 2, 0, 30))


def test_a_short_delay_within_grace_fires_with_either_policy() -> None:
    timing = Timing(cron="0 * * * *")
    down = (utc(2026, 6, 1, 0, 59), utc(2026, 6, 1, 1, 3))
    for policy in ("skip", "run_once"):
        fired = simulate(timing, utc(2026, 6, 1, 0, 30), utc(2026, 6, 1, 1, 30), down=down,
                         policy=policy)  # fmt: skip
        assert fired == [(utc(2026, 6, 1, 1, 3), utc(2026, 6, 1, 1))]


def test_a_minutely_schedule_down_for_a_month_catches_up_once() -> None:
    timing = Timing(cron="* * * * *")
    due, now = utc(2026, 5, 1), utc(2026, 6, 1, 12, 0) + timedelta(seconds=30)
    plan = plan_tick(timing, due, now, anchor=due, policy="run_once", grace_seconds=60)
    assert (plan.fire_at, plan.next_run_at) == (utc(2026, 6, 1, 12, 0), utc(2026, 6, 1, 12, 1))
    interval = Timing(cron=None, interval_seconds=60)
    plan = plan_tick(interval, due, now, anchor=due, policy="skip", grace_seconds=60)
    assert (plan.fire_at, plan.next_run_at) == (utc(2026, 6, 1, 12, 0), utc(2026, 6, 1, 12, 1))


def test_interval_schedules_count_from_their_anchor() -> None:
    timing = Timing(cron=None, interval_seconds=3600)
    anchor = utc(2026, 6, 1, 0, 10)
    assert timing.next_after(anchor, anchor=anchor) == utc(2026, 6, 1, 1, 10)
    assert timing.next_after(utc(2026, 6, 1, 5, 0), anchor=anchor) == utc(2026, 6, 1, 5, 10)


@pytest.mark.parametrize(
    "body",
    [
        {"target": "127.0.0.1"},
        {"target": "127.0.0.1", "cron": "0 2 * * *", "interval_seconds": 3600},
        {"target": "127.0.0.1", "cron": "0 2 * *"},
        {"target": "127.0.0.1", "cron": "0 0 2 * * *"},
        {"target": "127.0.0.1", "cron": "0 2 * * *", "timezone": "Mars/Olympus"},
        {"target": "127.0.0.1", "cron": "0 2 * * *", "exclude": ["not-a-cidr"]},
        {"target": "127.0.0.1", "interval_seconds": 5},
        {"target": "127.0.0.1", "cron": "0 2 * * *", "force": True},
        {"target": "127.0.0.1", "cron": "0 0 30 2 *"},
    ],
)
def test_bad_schedules_are_refused(body: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ScheduleCreate.model_validate(body)


@given(
    zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe"]),
    cron=st.sampled_from(["30 2 * * *", "30 1 * * *", "*/15 * * * *", "0 * * * 0", "45 0 1 * *"]),
    moment=st.datetimes(
        min_value=datetime(2026, 1, 1), max_value=datetime(2028, 12, 31), timezones=st.just(UTC)
    ),
)
@settings(max_examples=300, deadline=None, derandomize=True, database=None)
def test_forward_and_backward_agree(zone: str, cron: str, moment: datetime) -> None:
    """The next run after a moment and the last one at or before it are neighbours, in any
    zone, across every DST change (Lord Howe's moves by half an hour)."""
    timing = Timing(cron=cron, timezone=zone)
    following = timing.next_after(moment)
    last = timing.last_at_or_before(moment)
    assert last is not None
    assert last <= moment < following
    assert timing.next_after(last) == following
    assert timing.last_at_or_before(following) == following
