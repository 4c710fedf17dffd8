"""Bearer API keys: looked up by their SHA-256 digest, cached briefly per process."""

from __future__ import annotations

import time
from uuid import UUID

from starlette.requests import Request

from api_service.errors import ApiError, db_unavailable
from shared.keys import KeyStore, hash_key
from shared.retry import DATABASE_ERRORS

CACHE_SECONDS = 5.0
"""How long a key stays valid in one process after it was revoked."""

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="cybersec-scan"'}


class Authenticator:
    def __init__(self, keys: KeyStore, *, stale_seconds: float = 60.0) -> None:
        """``stale_seconds``: how long after its last successful check a key is still
        honoured while PostgreSQL is away (a revocation made meanwhile cannot be seen)."""
        self.keys = keys
        self.stale_seconds = stale_seconds
        self._cache: dict[bytes, tuple[UUID | None, float]] = {}

    async def key_id(self, key: str) -> UUID | None:
        # The lookup goes by digest, never by the key text, so timing reveals nothing of a key.
        digest = hash_key(key)
        cached = self._cache.get(digest)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0]
        try:
            key_id = await self.keys.lookup(key)
        except DATABASE_ERRORS as exc:
            # While PostgreSQL is away, a key seen valid shortly before still reads its scans
            # from Redis; an unknown one, or one not checked for too long, cannot be.
            checked_at = cached[1] - CACHE_SECONDS if cached is not None else None
            if (
                cached is not None
                and cached[0] is not None
                and checked_at is not None
                and now - checked_at <= self.stale_seconds
            ):
                return cached[0]
            raise db_unavailable() from exc
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (key_id, now + CACHE_SECONDS)
        return key_id

    async def authenticate(self, request: Request) -> UUID:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(
                401, "send an API key as 'Authorization: Bearer <key>'", headers=_CHALLENGE
            )
        key_id = await self.key_id(key.strip())
        if key_id is None:
            raise ApiError(401, "unknown or revoked API key", headers=_CHALLENGE)
        return key_id
