"""Per-key limits, checked and counted atomically in Redis by one Lua script.

Concurrent submissions are batched (``shared.batching``) into one EVALSHA that decides each in
turn, atomically, and answers a verdict per submission: one command per round trip rather than
one per submission, which is most of what the limiter costs the gateway. An admitted
submission's owner is recorded by the same call (see ``shared.redis_keys.owner_key``), so that
status reads can check ownership while PostgreSQL is unreachable.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from uuid import UUID

import redis.asyncio as aioredis
from redis.exceptions import MaxConnectionsError, NoScriptError, RedisError

from api_service.errors import ApiError
from shared.batching import Batcher
from shared.redis_keys import active_key, critical_key, owner_key, owner_value, rate_key

log = logging.getLogger(__name__)

# For submission i (from 0): KEYS[3i+1] its key's submissions-this-minute counter, KEYS[3i+2]
# its key's active-scans sorted set (member task id, score deadline), KEYS[3i+3] its owner key.
# ARGV: now, per-minute limit, active limit, owner key TTL, then per submission: task id,
# task deadline, seconds left in the minute window, owner value.
# Returns {verdict, retry-after} per submission: 0 admitted, 1 over the rate, 2 too many active.
_ADMIT = """
local now, owner_ttl = ARGV[1], ARGV[4]
local per_minute, max_active = tonumber(ARGV[2]), tonumber(ARGV[3])
local verdicts = {}
for i = 0, #KEYS / 3 - 1 do
  local rate, active, owner = KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3]
  local task, deadline = ARGV[4 * i + 5], ARGV[4 * i + 6]
  local window, who = ARGV[4 * i + 7], ARGV[4 * i + 8]
  redis.call('ZREMRANGEBYSCORE', active, '-inf', now)
  if redis.call('ZCARD', active) >= max_active then
    verdicts[#verdicts + 1] = 2
    verdicts[#verdicts + 1] = 0
  else
    local n = redis.call('INCR', rate)
    if n == 1 then redis.call('EXPIRE', rate, window) end
    if n > per_minute then
      verdicts[#verdicts + 1] = 1
      verdicts[#verdicts + 1] = redis.call('TTL', rate)
    else
      redis.call('ZADD', active, deadline, task)
      redis.call('EXPIRE', active, 86400)
      redis.call('SET', owner, who, 'EX', owner_ttl)
      verdicts[#verdicts + 1] = 0
      verdicts[#verdicts + 1] = 0
    end
  end
end
return verdicts
"""


class Limiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        per_minute: int,
        max_active: int,
        owner_ttl: int = 86_400,
        critical_per_minute: int | None = None,
    ) -> None:
        """``critical_per_minute``: the key's share of the critical level, in submissions a
        minute (None: no share of its own, only the rate)."""
        self.redis = redis
        self.critical_per_minute = critical_per_minute
        self.prefix = prefix
        self.per_minute = per_minute
        self.max_active = max_active
        self.owner_ttl = owner_ttl
        self._sha = redis.register_script(_ADMIT).sha
        self._batch: Batcher[tuple[list[str], list[Any]], tuple[int, int]] = Batcher(self._run_many)

    async def _run_many(
        self, calls: list[tuple[list[str], list[Any]]]
    ) -> list[tuple[int, int] | Exception]:
        """One EVALSHA for the whole batch; a Redis error answers every caller of it."""
        keys = [key for call_keys, _args in calls for key in call_keys]
        args: list[Any] = [time.time(), self.per_minute, self.max_active, self.owner_ttl]
        args += [arg for _keys, call_args in calls for arg in call_args]
        try:
            flat = await self.redis.evalsha(self._sha, len(keys), *keys, *args)
        except NoScriptError:  # Redis restarted or flushed its script cache: nothing ran
            await self.redis.script_load(_ADMIT)
            flat = await self.redis.evalsha(self._sha, len(keys), *keys, *args)
        return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def admit(self, owner: UUID, task_id: UUID, scan_id: UUID, deadline_seconds: int) -> None:
        """Count a submission and record its owner; raise 429 when the key is over either limit.

        When Redis is unreachable submissions are admitted (and logged): a result-backend
        outage must not stop scanning, and PostgreSQL still records every scan. A pool with
        no connection left is not an outage, it is load: that is a 503, never an admission.
        """
        now = time.time()
        window = int(now // 60)
        try:
            verdict, retry = await self._batch.submit(
                (
                    [
                        rate_key(self.prefix, owner, window),
                        active_key(self.prefix, owner),
                        owner_key(self.prefix, task_id),
                    ],
                    [
                        str(task_id),
                        now + deadline_seconds,
                        61 - int(now % 60),
                        owner_value(owner, scan_id),
                    ],
                )
            )
        except MaxConnectionsError:
            raise _busy() from None
        except (RedisError, OSError) as exc:
            log.warning("rate limiter unavailable, admitting: %r", exc)
            return
        if verdict == 1:
            raise ApiError(
                429,
                f"over {self.per_minute} scan submissions per minute",
                headers={"Retry-After": str(max(1, int(retry)))},
            )
        if verdict == 2:
            raise ApiError(
                429,
                f"{self.max_active} scans already queued or running for this key",
                headers={"Retry-After": "5"},
            )

    async def admit_critical(self, owner: UUID) -> None:
        """Count a critical submission against the key's share of the critical level; 429
        over it. A key's critical scans jump every queue, so it gets only a share of them."""
        if self.critical_per_minute is None:
            return
        count, ttl = await self._count(critical_key(self.prefix, owner, int(time.time() // 60)))
        if count > self.critical_per_minute:
            raise ApiError(
                429,
                f"over {self.critical_per_minute} critical-priority submissions per minute;"
                " send it with a lower priority",
                field="priority",
                headers={"Retry-After": str(max(1, ttl))},
            )

    async def _count(self, key: str) -> tuple[int, int]:
        """INCR a per-minute counter; (count, seconds left). (0, 0) while Redis is away."""
        now = time.time()
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, 61 - int(now % 60), nx=True)
                pipe.ttl(key)
                count, _set, ttl = await pipe.execute()
        except MaxConnectionsError:
            raise _busy() from None
        except (RedisError, OSError) as exc:
            log.warning("rate limiter unavailable, not counting: %r", exc)
            return 0, 0
        return int(count), int(ttl)

    async def charge(self, owner: UUID) -> None:
        """Count a refused submission against the key's rate: 429 once it is over.

        A request that fails validation or the target policy costs the gateway work too, so
        it is counted like an admitted one (only its active-scan slot is not taken)."""
        count, ttl = await self._count(rate_key(self.prefix, owner, int(time.time() // 60)))
        if count > self.per_minute:
            raise ApiError(
                429,
                f"over {self.per_minute} scan submissions per minute",
                headers={"Retry-After": str(max(1, int(ttl)))},
            )

    async def release(self, owner: UUID, task_id: UUID) -> None:
        try:
            await self.redis.zrem(active_key(self.prefix, owner), str(task_id))
        except (RedisError, OSError) as exc:
            log.warning("could not release active slot of %s: %r", task_id, exc)


def _busy() -> ApiError:
    return ApiError(503, "too busy to check the limits; retry", headers={"Retry-After": "1"})
