"""API keys: generated once, shown once, stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID, uuid4

import asyncpg

KEY_PREFIX = "cs_"


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> bytes:
    # Keys are 256-bit random tokens, so a fast hash is enough; a slow KDF would only cost latency.
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: UUID
    name: str
    key_prefix: str
    source: str
    created_at: datetime
    revoked_at: datetime | None


class KeyStore:
    def __init__(self, pool: asyncpg.Pool[Any]) -> None:
        self.pool = pool

    async def create(self, name: str, *, key: str | None = None, source: str = "cli") -> str:
        """Register a key (a new one unless given); returns the key text, which is not stored."""
        key = key or generate_key()
        await self.pool.execute(
            "INSERT INTO api_keys (id, name, key_hash, key_prefix, source)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key_hash) DO NOTHING",
            uuid4(),
            name,
            hash_key(key),
            key[:10],
            source,
        )
        return key

    async def lookup(self, key: str) -> UUID | None:
        """The id of the active key with this text, or None."""
        key_id: UUID | None = await self.pool.fetchval(
            "SELECT id FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL", hash_key(key)
        )
        return key_id

    async def list(self) -> list[ApiKey]:
        rows = await self.pool.fetch(
            "SELECT id, name, key_prefix, source, created_at, revoked_at FROM api_keys"
            " ORDER BY created_at"
        )
        return [ApiKey(**dict(row)) for row in rows]

    async def revoke(self, ident: str) -> int:
        """Revoke by id, name or key prefix; returns how many keys were revoked."""
        try:
            key_id: UUID | None = UUID(ident)
        except ValueError:
            key_id = None
        result: str = await self.pool.execute(
            "UPDATE api_keys SET revoked_at = now() WHERE revoked_at IS NULL"
            " AND (id = $1 OR name = $2 OR key_prefix = $2)",
            key_id,
            ident,
        )
        return int(result.split()[-1])
