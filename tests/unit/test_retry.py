"""The one retry policy: transient errors, full-jitter backoff, deadlines."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from shared.errors import TargetDenied, TransientError
from shared.retry import Deadline, RetryPolicy, backoff, is_transient, retry

FAST = RetryPolicy(base=0.001, cap=0.002)


def test_what_is_transient() -> None:
    assert is_transient(ConnectionRefusedError())
    assert is_transient(TimeoutError())
    assert is_transient(asyncpg.CannotConnectNowError())
    assert not is_transient(asyncpg.UndefinedTableError())
    assert not is_transient(ValueError())
    assert is_transient(TransientError())
    # Rolled back whole by the server: the same transaction run again may succeed.
    assert is_transient(asyncpg.DeadlockDetectedError())
    assert is_transient(asyncpg.SerializationError())
    assert not is_transient(TargetDenied("no"))


def test_backoff_is_full_jitter_under_a_cap() -> None:
    delays = [backoff(attempt, base=1.0, cap=4.0) for attempt in range(10) for _ in range(20)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert all(0 <= backoff(0, base=1.0, cap=30.0) <= 1.0 for _ in range(50))


async def test_transient_errors_are_retried_until_the_call_succeeds() -> None:
    failures = [ConnectionResetError(), asyncpg.CannotConnectNowError()]

    async def flaky() -> str:
        if failures:
            raise failures.pop()
        return "done"

    assert await retry(flaky, Deadline.after(5), policy=FAST) == "done"
    assert failures == []


async def test_other_errors_are_raised_at_once() -> None:
    calls = 0

    async def broken() -> None:
        nonlocal calls
        calls += 1
        raise asyncpg.UndefinedTableError("no table")

    with pytest.raises(asyncpg.UndefinedTableError):
        await retry(broken, Deadline.after(5), policy=FAST)
    assert calls == 1


async def test_the_deadline_bounds_a_call_that_hangs() -> None:
    async def hangs() -> None:
        await asyncio.Event().wait()

    with pytest.raises(TimeoutError):
        await retry(hangs, Deadline.after(0.05), policy=FAST)


async def test_the_last_error_is_raised_at_the_deadline() -> None:
    async def away() -> None:
        raise ConnectionRefusedError("database away")

    with pytest.raises(ConnectionRefusedError):
        await retry(away, Deadline.after(0.05), policy=FAST)
