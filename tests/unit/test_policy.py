from __future__ import annotations

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
    TargetPolicy().check_address(address)  # raises TargetDenied when denied
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
        assert policy.check_hostname(name) is False


def test_allowed_name_lifts_default_deny_for_its_addresses_only() -> None:
    policy = TargetPolicy(allow=["*.lab.example"], deny=["127.0.0.66"])
    assert policy.check_hostname("box.lab.example") is True
    policy.check_address("127.0.0.1", name_allowed=True)
    with pytest.raises(TargetDenied):
        policy.check_address("127.0.0.66", name_allowed=True)
    with pytest.raises(TargetDenied):
        policy.check_address("127.0.0.1")


def test_networks_are_checked_address_by_address() -> None:
    import ipaddress

    policy = TargetPolicy(allow=["127.0.0.0/8"], deny=["127.0.0.66/32"])
    policy.check_network(ipaddress.ip_network("127.0.0.0/28"))
    with pytest.raises(TargetDenied):
        policy.check_network(ipaddress.ip_network("127.0.0.64/29"))


def test_a_lone_star_matches_every_hostname() -> None:
    policy = TargetPolicy(deny=["*"])
    for name in ("localhost", "a.b.example"):
        with pytest.raises(TargetDenied):
            policy.check_hostname(name)
