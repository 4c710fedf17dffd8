"""Per-key limits, checked and counted atomically in Redis by one Lua script.

Each submission runs the script once (EVALSHA, so atomic per submission); the calls of
concurrent submissions share one pipelined round trip, each reading its own verdict. An
admitted submission's owner is recorded by the same call (see ``shared.redis_keys.owner_key``),
so that status reads can check ownership while PostgreSQL is unreachable.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from uuid import UUID

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisError

from api_service.errors import ApiError
from shared.batching import Batcher
from shared.redis_keys import active_key, owner_key, owner_value, rate_key

log = logging.getLogger(__name__)

# KEYS: submissions-this-minute counter, active-scans sorted set (member task id, score deadline),
#       the task's owner key
# ARGV: now, per-minute limit, active limit, task id, task deadline, window seconds left,
#       owner value, owner key TTL
_ADMIT = """
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
  return {2, 0}
end
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[6]) end
if n > tonumber(ARGV[2]) then
  return {1, redis.call('TTL', KEYS[1])}
end
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('EXPIRE', KEYS[2], 86400)
redis.call('SET', KEYS[3], ARGV[7], 'EX', ARGV[8])
return {0, 0}
"""


class Limiter:
    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        per_minute: int,
        max_active: int,
        owner_ttl: int = 86_400,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.per_minute = per_minute
        self.max_active = max_active
        self.owner_ttl = owner_ttl
        self._sha = redis.register_script(_ADMIT).sha
        self._batch: Batcher[list[Any], Any] = Batcher(self._run_many)

    async def _run_many(self, calls: list[list[Any]]) -> list[Any]:
        """One EVALSHA per call in one pipeline; exceptions come back in place of verdicts."""
        outcomes = await self._evalsha(calls)
        missing = [i for i, outcome in enumerate(outcomes) if isinstance(outcome, NoScriptError)]
        if missing:  # Redis restarted or flushed its script cache: none of these ran
            await self.redis.script_load(_ADMIT)
            retried = await self._evalsha([calls[i] for i in missing])
            for index, outcome in zip(missing, retried, strict=True):
                outcomes[index] = outcome
        return outcomes

    async def _evalsha(self, calls: list[list[Any]]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(self._sha, 3, *call)
            outcomes: list[Any] = await pipe.execute(raise_on_error=False)
        return outcomes

    async def admit(self, owner: UUID, task_id: UUID, scan_id: UUID, deadline_seconds: int) -> None:
        """Count a submission and record its owner; raise 429 when the key is over either limit.

        When Redis is unreachable submissions are admitted (and logged): a result-backend
        outage must not stop scanning, and PostgreSQL still records every scan.
        """
        now = time.time()
        window = int(now // 60)
        try:
            verdict, retry = await self._batch.submit(
                [
                    rate_key(self.prefix, owner, window),
                    active_key(self.prefix, owner),
                    owner_key(self.prefix, task_id),
                    now,
                    self.per_minute,
                    self.max_active,
                    str(task_id),
                    now + deadline_seconds,
                    61 - int(now % 60),
                    owner_value(owner, scan_id),
                    self.owner_ttl,
                ]
            )
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

    async def release(self, owner: UUID, task_id: UUID) -> None:
        try:
            await self.redis.zrem(active_key(self.prefix, owner), str(task_id))
        except (RedisError, OSError) as exc:
            log.warning("could not release active slot of %s: %r", task_id, exc)
