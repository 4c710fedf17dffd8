from __future__ import annotations

import ipaddress

import pytest

from shared.errors import TargetDenied
from shared.policy import TargetPolicy


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "169.254.169.254",
        "fe80::1",
        "224.0.0.1",
        "ff02::1",
        "0.0.0.0",
        "::",
        "240.0.0.1",
        "255.255.255.255",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
    ],
)
def test_default_deny(address: str) -> None:
    with pytest.raises(TargetDenied):
        TargetPolicy().check_address(address)


@pytest.mark.parametrize("address", ["10.1.2.3", "192.168.1.1", "8.8.8.8", "2606:4700::1111"])
def test_ordinary_addresses_pass_by_default(address: str) -> None:
    TargetPolicy(own=()).check_address(address)  # raises TargetDenied when denied
    with pytest.raises(TargetDenied, match="denied by the target policy"):
        TargetPolicy((), (address,)).check_address(address)


def test_allow_lifts_default_deny_and_deny_wins() -> None:
    policy = TargetPolicy(allow=["127.0.0.0/8", "::1"], deny=["127.0.0.66", "10.0.0.0/8"])
    policy.check_address("127.0.0.1")
    policy.check_address("::1")
    with pytest.raises(TargetDenied, match="denied by the target policy"):
        policy.check_address("127.0.0.66")
    with pytest.raises(TargetDenied):
        policy.check_address("10.9.9.9")
    with pytest.raises(TargetDenied, match="link-local"):
        policy.check_address("169.254.169.254")


def test_hostnames_match_by_label_not_substring() -> None:
    policy = TargetPolicy(deny=["*.internal.example", "db.example.com"])
    for name in ("a.internal.example", "x.y.internal.example", "DB.Example.com."):
        with pytest.raises(TargetDenied):
            policy.check_hostname(name)
    for name in (
        "internal.example",
        "evilinternal.example",
        "internal.example.attacker.net",
        "db.example.com.attacker.net",
        "xdb.example.com",
    ):
        policy.check_hostname(name)  # raises when denied


@pytest.mark.parametrize("allow", [["*"], ["*.lab.example"], ["localhost"], ["0x7f000001"]])
@pytest.mark.parametrize(
    "resolved", ["127.0.0.1", "169.254.169.254", "::1", "fe80::1", "100.100.100.200"]
)
def test_an_allowed_name_never_lifts_the_default_deny(allow: list[str], resolved: str) -> None:
    policy = TargetPolicy(allow=allow, own=())
    policy.check_hostname("box.lab.example")  # the name itself is not denied
    with pytest.raises(TargetDenied, match="denied by default"):
        policy.check_address(resolved)


async def test_names_that_resolve_inward_are_refused_with_a_star_allow() -> None:
    from shared.resolve import resolve_target
    from shared.targets import parse_target

    policy = TargetPolicy(allow=["*"], own=())
    for name in ("localhost", "0x7f000001", "0xa9fea9fe"):
        with pytest.raises(TargetDenied):
            await resolve_target(parse_target(name), policy, timeout=3)


@pytest.mark.parametrize(
    "address",
    [
        "100.100.100.200",
        "fd00:ec2::254",
        "168.63.129.16",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "64:ff9b:1::a9fe:a9fe",
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    ],
)
def test_default_deny_covers_metadata_and_embedded_addresses(address: str) -> None:
    with pytest.raises(TargetDenied):
        TargetPolicy(own=()).check_address(address)


def test_this_hosts_own_addresses_are_denied_unless_explicitly_allowed() -> None:
    from shared.policy import own_addresses

    mine = own_addresses()
    assert ipaddress.ip_address("127.0.0.1") in mine or not mine
    policy = TargetPolicy(own=[ipaddress.ip_address("10.20.30.40")])
    with pytest.raises(TargetDenied, match="address of this host"):
        policy.check_address("10.20.30.40")
    TargetPolicy(allow=["10.20.30.0/24"], own=[ipaddress.ip_address("10.20.30.40")]).check_address(
        "10.20.30.40"
    )
    for address in mine:
        with pytest.raises(TargetDenied):
            TargetPolicy().check_address(address)


def test_networks_are_checked_address_by_address() -> None:
    policy = TargetPolicy(allow=["127.0.0.0/8"], deny=["127.0.0.66/32"])
    policy.check_network(ipaddress.ip_network("127.0.0.0/28"))
    with pytest.raises(TargetDenied):
        policy.check_network(ipaddress.ip_network("127.0.0.64/29"))


def test_a_lone_star_matches_every_hostname() -> None:
    policy = TargetPolicy(deny=["*"])
    for name in ("localhost", "a.b.example"):
        with pytest.raises(TargetDenied):
            policy.check_hostname(name)


async def test_lookups_beyond_the_bound_wait_within_the_timeout() -> None:
    """Lookups ran on the loop's small thread pool without bound; now a turn is needed, and
    waiting for one counts against the resolve timeout."""
    import asyncio

    from shared.errors import ResolutionFailed
    from shared.resolve import resolve_target
    from shared.targets import parse_target

    lookups = asyncio.Semaphore(1)
    policy = TargetPolicy(allow=["127.0.0.0/8", "::1"], own=())
    await lookups.acquire()  # every turn taken
    with pytest.raises(ResolutionFailed, match="did not resolve within"):
        await resolve_target(parse_target("localhost"), policy, timeout=0.2, lookups=lookups)
    lookups.release()
    addresses = await resolve_target(parse_target("localhost"), policy, timeout=3, lookups=lookups)
    assert "127.0.0.1" in addresses
    assert not lookups.locked()  # the turn came back when the lookup ended
