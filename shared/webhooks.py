"""Change alerts as Standard Webhooks: the models, the events, and which URLs may receive them.

A webhook URL is checked twice, when it is registered and before every attempt: http(s) only,
no credentials, no odd IP spellings (``0x7f.1``, ``2130706433``, ``0177.0.0.1``); every address
its host resolves to must pass :class:`WebhookAddresses` (the target policy's deny list and
cloud metadata always refuse; otherwise global unicast only, unless an operator lists its
network in ``CYBERSEC_WEBHOOK_ALLOW_NETWORKS``). The sender then connects to the address it
checked.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, get_args
from urllib.parse import urlsplit
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.errors import ResolutionFailed, TargetDenied
from shared.policy import METADATA, TargetPolicy, embedded_ipv4
from shared.resolve import resolve_name
from shared.settings import Settings
from shared.targets import MAX_HOSTS_LIMIT, IPAddress, IPNetwork, parse_target

EventType = Literal["scan.completed", "scan.failed", "ports.changed"]
EVENT_TYPES: tuple[EventType, ...] = get_args(EventType)
MessageState = Literal["pending", "delivered", "failed"]
MAX_URL = 2048
_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_NUMERIC_LABEL = re.compile(r"(0x[0-9a-f]*|[0-9]+)")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WebhookCreate(_Strict):
    url: str = Field(max_length=MAX_URL)
    events: list[EventType] = Field(min_length=1, max_length=len(EVENT_TYPES))
    schedule_id: UUID | None = Field(default=None, description="Only this schedule's scans")
    target: str | None = Field(default=None, max_length=255, description="Only this target")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parse_webhook_url(value)
        return value

    @field_validator("events")
    @classmethod
    def _events(cls, value: list[EventType]) -> list[EventType]:
        return sorted(set(value), key=EVENT_TYPES.index)

    @field_validator("target")
    @classmethod
    def _target(cls, value: str | None) -> str | None:
        return None if value is None else parse_target(value, max_hosts=MAX_HOSTS_LIMIT).value


class WebhookUpdate(_Strict):
    """PATCH body: turn an endpoint off, or on again after it was disabled."""

    enabled: bool


class Webhook(_Strict):
    id: UUID
    url: str
    events: list[EventType]
    schedule_id: UUID | None
    target: str | None
    enabled: bool
    disabled_reason: str | None
    failing_since: datetime | None
    created_at: datetime


class WebhookCreated(Webhook):
    secret: str = Field(description="whsec_…: shown once; verify signatures with it")


class WebhookList(_Strict):
    items: list[Webhook]


class DeliveryAttempt(_Strict):
    attempted_at: datetime
    status_code: int | None
    error: str | None
    duration_ms: int


class Delivery(_Strict):
    """One message to one endpoint, with every attempt made to deliver it."""

    id: str
    event_type: EventType
    scan_id: UUID | None
    state: MessageState
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None
    payload: dict[str, object]
    history: list[DeliveryAttempt]


class DeliveryList(_Strict):
    items: list[Delivery]


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(16)


# --- which URLs ----------------------------------------------------------------------------


class WebhookUrlError(ValueError):
    """A URL webhooks may not be sent to; the message says why."""


@dataclass(frozen=True, slots=True)
class WebhookUrl:
    scheme: Literal["http", "https"]
    host: str
    """Lower-case name, or a canonical IP address."""
    port: int
    target: str
    """Path and query, as sent in the request line."""

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def pinned(self, address: IPAddress) -> str:
        """The URL with its host replaced by a checked address."""
        host = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{host}:{self.port}{self.target}"


def parse_webhook_url(text: str) -> WebhookUrl:
    if len(text) > MAX_URL or any(c.isspace() or ord(c) < 32 for c in text):
        raise WebhookUrlError("url: not a URL")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"url: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlError("url: only http and https URLs")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlError("url: credentials in the URL are not accepted")
    host = (parts.hostname or "").removesuffix(".")
    if not host:
        raise WebhookUrlError("url: no host")
    host = _canonical_host(host, bracketed=parts.netloc.rpartition("@")[2].startswith("["))
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
    return WebhookUrl(scheme, host, port or (443 if scheme == "https" else 80), target)


def _canonical_host(host: str, *, bracketed: bool) -> str:
    if bracketed:
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise WebhookUrlError("url: bracketed host is not an IPv6 address") from None
        if "%" in host:
            raise WebhookUrlError("url: IPv6 zones are not accepted")
        return str(address)
    try:
        address4 = ipaddress.IPv4Address(host)
    except ValueError:
        pass
    else:
        if str(address4) != host:
            raise WebhookUrlError(f"url: {host!r} is an unusual spelling of {address4}")
        return host
    labels = host.split(".")
    # What inet_aton would read as an address (127.1, 0x7f.0.0.1, 2130706433, 0177.0.0.1)
    # is refused: a resolver or a proxy may read it one way, this check another.
    if _NUMERIC_LABEL.fullmatch(labels[-1]) or all(_NUMERIC_LABEL.fullmatch(x) for x in labels):
        raise WebhookUrlError(f"url: {host!r} is an unusual spelling of an IP address")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise WebhookUrlError(f"url: {host!r} is not a host name")
    return host


_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")


class WebhookAddresses:
    """Which addresses webhooks may go to: the target policy's (one address policy, built
    once), with the webhook allow list in place of the target allow list, and global
    addresses only unless allowed.

    Deny wins over allow: the target deny list and the cloud metadata addresses refuse an
    address whatever the allow list says; an IPv6 address that embeds an IPv4 one (mapped,
    NAT64, 6to4, Teredo) is checked as that one too. Past the policy an address must be
    global unicast (IPv6: inside 2000::/3 and embedding no IPv4 address) unless an allowed
    network holds it: ``ipaddress.is_global`` alone passes 2002::/16, 64:ff9b:1::/48 and
    ``::7f00:1`` on Python 3.11."""

    def __init__(
        self,
        allow: Iterable[IPNetwork],
        deny: Iterable[str] = (),
        *,
        own: Iterable[IPAddress] | None = None,
    ) -> None:
        self.allow = tuple(ipaddress.ip_network(str(n), strict=False) for n in allow)
        self.policy = TargetPolicy(
            [str(network) for network in self.allow],
            (*deny, *(str(network) for network in METADATA)),
            own=own,
        )

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookAddresses:
        return cls(settings.webhook_allow_networks, settings.target_deny)

    def refused(self, address: IPAddress) -> str | None:
        """Why webhooks may not go to this address, or None."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        try:
            self.policy.check_address(address)
        except TargetDenied:
            return f"{address} is not an address webhooks may be sent to"
        for candidate in (address, *embedded_ipv4(address)):
            if not self._allowed(candidate) and not _global_unicast(candidate):
                return f"{address} is not an address webhooks may be sent to"
        return None

    def _allowed(self, address: IPAddress) -> bool:
        return any(address.version == n.version and address in n for n in self.allow)


def _global_unicast(address: IPAddress) -> bool:
    if not address.is_global or address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        return address in _GLOBAL_UNICAST_V6 and not embedded_ipv4(address)
    return True


async def resolve_webhook_url(
    url: WebhookUrl,
    addresses_policy: WebhookAddresses,
    *,
    timeout: float,
    lookups: asyncio.Semaphore | None = None,
) -> list[IPAddress]:
    """Every address of the URL's host, each one checked; raises :class:`WebhookUrlError`.
    ``lookups`` bounds the name lookups in flight, as for scan targets."""
    try:
        addresses: list[IPAddress] = [ipaddress.ip_address(url.host)]
    except ValueError:
        try:
            names = await resolve_name(url.host, timeout=timeout, lookups=lookups)
        except ResolutionFailed as exc:
            raise WebhookUrlError(f"url: {exc}") from None
        addresses = sorted(
            {ipaddress.ip_address(name) for name in names}, key=lambda a: (a.version, int(a))
        )
    if not addresses:
        raise WebhookUrlError(f"url: {url.host} resolves to no address")
    for address in addresses:
        reason = addresses_policy.refused(address)
        if reason is not None:
            raise WebhookUrlError(f"url: {url.host} resolves to {reason}")
    return addresses
