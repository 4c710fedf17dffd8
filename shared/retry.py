"""The one retry policy: which errors are transient, backoff with full jitter, and deadlines.

The gateway and the worker both ask :func:`is_transient` whether a dependency blinked, and the
worker retries PostgreSQL calls with :func:`retry` until a :class:`Deadline` it was given.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg
from redis.asyncio.retry import Retry as AsyncRedisRetry
from redis.backoff import NoBackoff
from redis.retry import Retry as RedisRetry

from shared.errors import TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")

_UNREACHABLE: tuple[type[Exception], ...] = (
    asyncpg.PostgresConnectionError,
    # A server shutting down or starting up: admin shutdown, crash, "cannot connect now".
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
    # Refused, reset, timed out, and a database host that no longer resolves (a stopped
    # container's name): all OSError. TimeoutError is one too, since Python 3.11.
    OSError,
)

TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    *_UNREACHABLE,
    # A deadlock victim, a serialization failure: the transaction was rolled back whole, and
    # the same one run again may succeed.
    asyncpg.TransactionRollbackError,
    TransientError,
)
"""Errors after which the same call may succeed: worth a retry (our own ``TransientError``s
included)."""

DATABASE_ERRORS: tuple[type[Exception], ...] = (asyncpg.PostgresError, *_UNREACHABLE)
"""Everything a PostgreSQL call can raise when the database is not answering as it should; the
gateway answers them all with 503 "database unavailable" (a client can do nothing else)."""


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS)


def backoff(attempt: int, *, base: float = 1.0, cap: float = 30.0) -> float:
    """Seconds before retry number ``attempt`` (0 first): exponential with full jitter."""
    return random.uniform(0, min(cap, base * 2 ** max(0, attempt)))


@dataclass(frozen=True, slots=True)
class Deadline:
    """A point on the monotonic clock that work must end by."""

    at: float

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(time.monotonic() + seconds)

    @property
    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    @property
    def passed(self) -> bool:
        return time.monotonic() >= self.at

    def sooner(self, seconds: float) -> Deadline:
        """This deadline or ``seconds`` from now, whichever comes first."""
        return Deadline(min(self.at, time.monotonic() + seconds))


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base: float = 0.5
    cap: float = 15.0


DATABASE_RETRY = RetryPolicy()


async def retry(
    action: Callable[[], Awaitable[T]],
    deadline: Deadline,
    *,
    policy: RetryPolicy = DATABASE_RETRY,
    what: str = "database call",
) -> T:
    """``action()``, retried after transient errors with backoff until ``deadline``.

    The whole call, a hung connect or query included, ends by the deadline: past it the last
    transient error (or TimeoutError) is raised. Any other error is raised at once."""
    attempt = 0
    while True:
        try:
            async with asyncio.timeout(max(deadline.remaining, 0.001)):
                return await action()
        except TRANSIENT_ERRORS as exc:
            delay = backoff(attempt, base=policy.base, cap=policy.cap)
            attempt += 1
            if delay >= deadline.remaining:
                raise
            log.warning("%s failed (%r), retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)


REDIS_RETRIES = 1
"""How often a Redis command is tried again, at once, on a fresh connection: one pooled
connection that a Redis restart closed costs one retry. redis-py 8's default for a client
made from a URL (10 retries with backoff) turns a stopped Redis into seconds per call and one
that accepts and hangs into eleven socket timeouts, on every request of the gateway."""


def redis_retry() -> RedisRetry:
    """The retry of every synchronous Redis client this project makes from a URL."""
    return RedisRetry(NoBackoff(), REDIS_RETRIES)


def async_redis_retry() -> AsyncRedisRetry:
    """The retry of every asyncio Redis client this project makes from a URL."""
    return AsyncRedisRetry(NoBackoff(), REDIS_RETRIES)
