"""API keys of one test alone, made and removed straight in PostgreSQL."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import asyncpg


@asynccontextmanager
async def own_key(pool: asyncpg.Pool[Any], name: str) -> AsyncIterator[UUID]:
    """A key id of its own; its webhooks, scans and schedules go with it at the end."""
    key_id: UUID = await pool.fetchval(
        "INSERT INTO api_keys (id, name, key_hash, key_prefix) VALUES"
        " (gen_random_uuid(), $1, $2, 'test') RETURNING id",
        name,
        secrets.token_bytes(32),
    )
    try:
        yield key_id
    finally:
        await pool.execute("DELETE FROM webhooks WHERE api_key_id = $1", key_id)
        await pool.execute("DELETE FROM scans WHERE api_key_id = $1", key_id)
        await pool.execute("DELETE FROM schedules WHERE api_key_id = $1", key_id)


async def revoke(pool: asyncpg.Pool[Any], key_id: UUID) -> None:
    await pool.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
