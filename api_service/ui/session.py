"""The dashboard's session: a signed, expiring cookie with the signed-in key's id and a CSRF token.

The cookie never holds the key itself, only the id of its row and a session id, and every page
checks that the key is still active and the session was not signed out, so revoking a key ends
its sessions and signing out ends this one even where a copy of the cookie survives.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

import asyncpg
from itsdangerous import BadSignature, URLSafeTimedSerializer
from starlette.requests import Request
from starlette.responses import Response

COOKIE = "cybersec_session"
COOKIE_PATH = "/ui"


@dataclass(frozen=True, slots=True)
class Session:
    csrf: str
    key_id: UUID | None = None
    sid: str = ""

    @classmethod
    def anonymous(cls) -> Session:
        return cls(csrf=secrets.token_urlsafe(24))

    def signed_in(self, key_id: UUID) -> Session:
        # A fresh CSRF token at sign-in: one seen before it cannot be replayed after.
        return Session(csrf=secrets.token_urlsafe(24), key_id=key_id, sid=secrets.token_urlsafe(18))

    def csrf_matches(self, token: str) -> bool:
        return hmac.compare_digest(self.csrf.encode(), token.encode())


async def stored_secret(pool: asyncpg.Pool[Any]) -> str:
    """The signing key kept in PostgreSQL, made by whichever API process asks first."""
    await pool.execute(
        "INSERT INTO dashboard_secret (value) VALUES ($1) ON CONFLICT (id) DO NOTHING",
        secrets.token_urlsafe(32),
    )
    value: str = await pool.fetchval("SELECT value FROM dashboard_secret")
    return value


async def session_state(
    pool: asyncpg.Pool[Any], session: Session
) -> Literal["live", "revoked", "signed_out"]:
    """Whether a signed-in session may open a page: its key is active and it was not signed
    out (a copy of its cookie kept from before does not count)."""
    record = await pool.fetchrow(
        "SELECT k.revoked_at IS NULL AS active,"
        " EXISTS (SELECT 1 FROM dashboard_signouts WHERE sid = $2) AS ended"
        " FROM api_keys k WHERE k.id = $1",
        session.key_id,
        session.sid,
    )
    if record is None or not record["active"]:
        return "revoked"
    return "signed_out" if record["ended"] else "live"


async def sign_out(pool: asyncpg.Pool[Any], session: Session, max_age: int) -> None:
    """End ``session`` for as long as its cookie could still be presented; forget the ends
    whose cookies have expired meanwhile."""
    await pool.execute(
        "WITH gone AS (DELETE FROM dashboard_signouts WHERE expires_at < now())"
        " INSERT INTO dashboard_signouts (sid, expires_at)"
        " VALUES ($1, now() + make_interval(secs => $2)) ON CONFLICT (sid) DO NOTHING",
        session.sid,
        float(max_age),
    )


class SessionCookies:
    """Reads and writes :class:`Session` cookies signed with ``secret``."""

    def __init__(self, secret: str, max_age: int) -> None:
        if not secret:
            raise ValueError("the dashboard's session cookies need a signing key")
        self._serializer = URLSafeTimedSerializer(secret, salt="cybersec-ui-session")
        self.max_age = max_age

    def load(self, request: Request) -> Session | None:
        raw = request.cookies.get(COOKIE)
        if not raw:
            return None
        try:
            data: Any = self._serializer.loads(raw, max_age=self.max_age)
        except BadSignature:  # expired ones too: SignatureExpired is a BadSignature
            return None
        if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
            return None
        key_id, sid = data.get("key"), data.get("sid") or ""
        if not isinstance(sid, str) or (key_id and not sid):
            return None  # a signed-in session always has its id
        try:
            return Session(csrf=data["csrf"], key_id=UUID(key_id) if key_id else None, sid=sid)
        except (TypeError, ValueError):
            return None

    def store(self, request: Request, response: Response, session: Session) -> None:
        value = self._serializer.dumps(
            {
                "csrf": session.csrf,
                "key": str(session.key_id) if session.key_id else None,
                "sid": session.sid,
            }
        )
        response.set_cookie(
            COOKIE,
            value,
            max_age=self.max_age,
            path=COOKIE_PATH,
            httponly=True,
            secure=_over_tls(request),
            samesite="strict",
        )

    def clear(self, request: Request, response: Response) -> None:
        response.delete_cookie(
            COOKIE,
            path=COOKIE_PATH,
            httponly=True,
            secure=_over_tls(request),
            samesite="strict",
        )


def _over_tls(request: Request) -> bool:
    # uvicorn sets the scheme from X-Forwarded-Proto when it trusts the proxy (--proxy-headers).
    return request.scope.get("scheme") == "https"
