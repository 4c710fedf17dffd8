"""A key seen valid before PostgreSQL went away is honoured for a bounded time only."""

from __future__ import annotations

import time
from typing import cast
from uuid import UUID, uuid4

import pytest

from api_service.auth import Authenticator
from api_service.errors import ApiError
from shared.keys import KeyStore


class FlakyKeys:
    """Answers lookups until ``down`` is set, then fails like an unreachable database."""

    def __init__(self, key_id: UUID) -> None:
        self.key_id = key_id
        self.down = False

    async def lookup(self, key: str) -> UUID | None:
        if self.down:
            raise OSError("connection refused")
        return self.key_id


async def test_a_cached_key_outlives_a_database_outage_only_for_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    keys = FlakyKeys(uuid4())
    authenticator = Authenticator(cast(KeyStore, keys), stale_seconds=60)
    assert await authenticator.key_id("k") == keys.key_id
    keys.down = True
    now[0] += 30  # past the 5 s cache, within the stale bound
    assert await authenticator.key_id("k") == keys.key_id
    now[0] += 31  # 61 s since the last real check: a revocation may have happened meanwhile
    with pytest.raises(ApiError) as refused:
        await authenticator.key_id("k")
    assert refused.value.status == 503
