"""Sends webhook messages: signed with ``standardwebhooks``, to the address that was checked.

Each attempt re-checks the URL (see ``shared.webhooks``), connects to one of the addresses it
checked — the request goes to that IP with the original ``Host`` header and TLS server name, so
nothing resolves the name again — follows no redirect, and reads at most
``CYBERSEC_WEBHOOK_MAX_RESPONSE_BYTES`` of the answer within ``CYBERSEC_WEBHOOK_TIMEOUT``.
2xx delivers; 410 disables the endpoint; anything else (3xx included) is retried on the
``CYBERSEC_WEBHOOK_RETRY_SCHEDULE``, later if the receiver's ``Retry-After`` asks for it.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx
from standardwebhooks.webhooks import Webhook as Signer

from shared.settings import Settings
from shared.webhook_store import AttemptOutcome, DueMessage, WebhookStore, body_of
from shared.webhooks import (
    WebhookAddresses,
    WebhookUrlError,
    parse_webhook_url,
    resolve_webhook_url,
)

log = logging.getLogger(__name__)

MAX_RETRY_AFTER = 86_400.0


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """``Retry-After`` as seconds from now: delta-seconds or an HTTP date; None if absent/odd."""
    if not value:
        return None
    text = value.strip()
    if text.isascii() and text.isdigit():
        return min(float(text), MAX_RETRY_AFTER)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return min(max((when - now).total_seconds(), 0.0), MAX_RETRY_AFTER)


class WebhookSender:
    def __init__(self, settings: Settings, *, verify: ssl.SSLContext | bool = True) -> None:
        """``verify``: how receivers' TLS certificates are checked (the system's CAs)."""
        self.settings = settings
        self.addresses = WebhookAddresses.from_settings(settings)
        self.lookups = asyncio.Semaphore(settings.max_concurrent_lookups)
        self.delays = settings.webhook_retry_delays
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,  # no proxy from the environment: the checked address is the peer
            timeout=settings.webhook_timeout,
            # Pooled connections are keyed by the address, not the name: a TLS session checked
            # for one host name must not carry a request for another name on the same address.
            limits=httpx.Limits(max_keepalive_connections=0),
            verify=verify,
        )

    async def close(self) -> None:
        await self.client.aclose()

    async def deliver_due(self, store: WebhookStore, now: datetime) -> int:
        # The lease outlasts an attempt: a lookup, then the request itself.
        lease = 2 * (self.settings.resolve_timeout + self.settings.webhook_timeout) + 30
        return await store.claim_due(now, lambda due: self._send_all(due, now), lease_seconds=lease)

    async def _send_all(self, due: list[DueMessage], now: datetime) -> list[AttemptOutcome]:
        return list(await asyncio.gather(*(self.attempt(message, now) for message in due)))

    async def attempt(self, message: DueMessage, now: datetime) -> AttemptOutcome:
        started = time.monotonic()
        status, error, retry_after = await self._post(message)
        elapsed = int((time.monotonic() - started) * 1000)
        if status is not None and 200 <= status < 300:
            return AttemptOutcome(status, None, elapsed, "delivered")
        if status == 410:
            return AttemptOutcome(
                status,
                "410 Gone",
                elapsed,
                "failed",
                disable_reason="the receiver answered 410 Gone",
            )
        if error is None:
            error = f"HTTP {status}" + (
                " (redirects are not followed)" if status and status < 400 else ""
            )
        disable = self._disable_reason(message, now)
        if message.attempts >= len(self.delays) or disable is not None:
            log.warning("webhook message %s failed for good: %s", message.id, error)
            return AttemptOutcome(status, error, elapsed, "failed", disable_reason=disable)
        delay = self.delays[message.attempts]
        if retry_after is not None:
            delay = max(delay, retry_after)
        return AttemptOutcome(
            status, error, elapsed, "pending", next_attempt_at=now + timedelta(seconds=delay)
        )

    def _disable_reason(self, message: DueMessage, now: datetime) -> str | None:
        since = message.failing_since
        if since is None or now - since < timedelta(seconds=self.settings.webhook_disable_after):
            return None
        reason = f"every delivery failed since {since.isoformat()}"
        log.error("webhook %s disabled: %s", message.webhook_id, reason)
        return reason

    async def _post(self, message: DueMessage) -> tuple[int | None, str | None, float | None]:
        """(status, error, Retry-After seconds) of one POST."""
        try:
            url = parse_webhook_url(message.url)
            addresses = await resolve_webhook_url(
                url, self.addresses, timeout=self.settings.resolve_timeout, lookups=self.lookups
            )
        except WebhookUrlError as exc:
            return None, str(exc), None
        body = body_of(message.payload)
        sent_at = datetime.now(UTC)
        headers = {
            "host": url.host_header,
            "content-type": "application/json",
            "user-agent": "cybersec-scan-webhooks",
            "webhook-id": message.id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": Signer(message.secret).sign(message.id, sent_at, body),
        }
        extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
        request = self.client.build_request(
            "POST",
            url.pinned(addresses[0]),
            content=body.encode(),
            headers=headers,
            extensions=extensions,
        )
        try:
            async with asyncio.timeout(self.settings.webhook_timeout):
                response = await self.client.send(request, stream=True)
                try:
                    await self._drain(response)
                finally:
                    await response.aclose()
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            return None, f"{type(exc).__name__}: {exc}"[:500], None
        retry_after = retry_after_seconds(response.headers.get("retry-after"), datetime.now(UTC))
        return response.status_code, None, retry_after

    async def _drain(self, response: httpx.Response) -> None:
        read = 0
        async for chunk in response.aiter_raw():
            read += len(chunk)
            if read >= self.settings.webhook_max_response_bytes:
                break
