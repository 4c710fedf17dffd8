"""Which URLs webhooks may go to, and how a receiver's Retry-After is read."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import pytest

from api_service.webhook_sender import retry_after_seconds
from shared.settings import Settings
from shared.webhooks import (
    WebhookAddresses,
    WebhookUrlError,
    parse_webhook_url,
    resolve_webhook_url,
)


def policy(*allow: str, deny: tuple[str, ...] = ()) -> WebhookAddresses:
    return WebhookAddresses([ipaddress.ip_network(n) for n in allow], deny, own=())


def refused(address: str, *allow: str, deny: tuple[str, ...] = ()) -> str | None:
    return policy(*allow, deny=deny).refused(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/hook",
        "file:///etc/passwd",
        "gopher://example.com/",
        "http://user:pass@example.com/",
        "http:///nohost",
        "http://127.1/",
        "http://0x7f.0.0.1/",
        "http://0x7f000001/",
        "http://2130706433/",
        "http://0177.0.0.1/",
        "http://017700000001/",
        "http://127.0.0.1.5/",
        "http://[::1%25eth0]/",
        "http://exa mple.com/",
        "http://example.com:99999/",
    ],
)
def test_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(WebhookUrlError):
        parse_webhook_url(url)


def test_a_url_keeps_its_host_for_the_header_and_pins_the_address() -> None:
    url = parse_webhook_url("https://Hooks.Example.com:8443/in?x=1")
    assert (url.scheme, url.host, url.port, url.target) == (
        "https",
        "hooks.example.com",
        8443,
        "/in?x=1",
    )
    assert url.host_header == "hooks.example.com:8443"
    assert url.pinned(ipaddress.ip_address("93.184.215.14")) == "https://93.184.215.14:8443/in?x=1"
    v6 = parse_webhook_url("http://[2606:4700::1]/")
    assert v6.host_header == "[2606:4700::1]"
    assert v6.pinned(ipaddress.ip_address("2606:4700::1")) == "http://[2606:4700::1]:80/"


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "64:ff9b::a00:1",
        # What ipaddress.is_global lets through on Python 3.11:
        "168.63.129.16",  # Azure WireServer
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a00:1::1",  # 6to4 of 10.0.0.1
        "64:ff9b:1::a00:1",  # local-use NAT64 of 10.0.0.1
        "::7f00:1",  # IPv4-compatible 127.0.0.1
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    ],
)
def test_non_global_addresses_are_refused(address: str) -> None:
    assert refused(address) is not None


def test_global_addresses_pass_and_the_operator_can_allow_more() -> None:
    assert refused("93.184.215.14") is None
    assert refused("2606:4700::1") is None
    assert refused("127.0.0.1", "127.0.0.0/8", "::1/128") is None
    assert refused("10.0.0.1", "127.0.0.0/8") is not None


@pytest.mark.parametrize(
    ("address", "allow"),
    [
        ("100.100.100.200", "100.64.0.0/10"),  # Alibaba metadata inside an allowed block
        ("169.254.169.254", "169.254.0.0/16"),
        ("168.63.129.16", "168.63.0.0/16"),
        ("fd00:ec2::254", "fd00::/8"),
        ("::ffff:169.254.169.254", "169.254.0.0/16"),
    ],
)
def test_cloud_metadata_is_never_allowable(address: str, allow: str) -> None:
    assert refused(address, allow) is not None


def test_the_target_deny_list_wins_over_the_webhook_allow_list() -> None:
    assert refused("10.1.2.3", "10.0.0.0/8") is None
    assert refused("10.1.2.3", "10.0.0.0/8", deny=("10.1.0.0/16",)) is not None
    assert refused("93.184.215.14", deny=("93.184.215.0/24",)) is not None


def test_a_bad_allow_network_stops_the_settings_from_loading() -> None:
    with pytest.raises(ValueError, match=r"10\.0\.0\.0/33"):
        Settings(webhook_allow_networks="10.0.0.0/33")
    parsed = Settings(webhook_allow_networks="10.0.0.1/8, ::1")
    assert parsed.webhook_allow_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )


async def test_a_name_is_refused_when_any_of_its_addresses_is() -> None:
    url = parse_webhook_url("http://localhost:9/")
    with pytest.raises(WebhookUrlError, match="not an address webhooks may be sent to"):
        await resolve_webhook_url(url, policy(), timeout=3)
    addresses = await resolve_webhook_url(url, policy("127.0.0.0/8", "::1/128"), timeout=3)
    assert ipaddress.ip_address("127.0.0.1") in addresses


def test_retry_after_as_seconds_or_a_date() -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
    assert retry_after_seconds("120", now) == 120
    assert retry_after_seconds("Wed, 02 Dec 2026 12:10:00 GMT", now) == 600
    assert retry_after_seconds("Wed, 02 Dec 2026 11:00:00 GMT", now) == 0
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None
    assert retry_after_seconds("99999999", now) == 86_400
