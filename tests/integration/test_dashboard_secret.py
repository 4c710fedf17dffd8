"""Every API process signs dashboard cookies with one key, stored in PostgreSQL."""

from __future__ import annotations

import asyncio

from api_service.ui.session import stored_secret
from shared.store import create_pool


async def test_every_process_gets_the_same_stored_signing_key(database: str) -> None:
    pools = [await create_pool(database, max_size=1) for _ in range(3)]
    try:
        # Three "replicas" starting at once: one key is made, all three read it.
        keys = await asyncio.gather(*(stored_secret(pool) for pool in pools))
        assert len(set(keys)) == 1
        assert len(keys[0]) >= 32
        assert await stored_secret(pools[0]) == keys[0]
    finally:
        for pool in pools:
            await pool.close()
