"""Which addresses a scan may touch. Enforced by the gateway and again by the worker.

Default deny covers loopback, link-local (cloud metadata included), multicast, unspecified and
reserved space. ``allow`` entries lift that default for what they match; ``deny`` entries always
win. Entries are CIDRs, addresses, hostnames, or ``*.domain`` wildcards matched label by label
(``*`` alone matches every hostname).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from shared.errors import TargetDenied
from shared.targets import IPAddress, IPNetwork

DEFAULT_DENY: tuple[tuple[str, IPNetwork], ...] = tuple(
    (reason, ipaddress.ip_network(cidr))
    for reason, cidrs in (
        ("loopback", ("127.0.0.0/8", "::1/128")),
        ("link-local", ("169.254.0.0/16", "fe80::/10")),
        ("multicast", ("224.0.0.0/4", "ff00::/8")),
        ("unspecified", ("0.0.0.0/8", "::/128")),
        ("reserved", ("240.0.0.0/4", "255.255.255.255/32", "100::/64", "2001:db8::/32")),
    )
    for cidr in cidrs
)


@dataclass(frozen=True, slots=True)
class _Rules:
    networks: tuple[IPNetwork, ...]
    names: frozenset[str]
    suffixes: tuple[tuple[str, ...], ...]
    """Label tuples of ``*.domain`` entries, reversed: ``*.example.com`` -> ("com", "example")."""

    @classmethod
    def parse(cls, entries: Iterable[str]) -> _Rules:
        networks: list[IPNetwork] = []
        names: set[str] = set()
        suffixes: list[tuple[str, ...]] = []
        for raw in entries:
            entry = raw.strip().lower().removesuffix(".")
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if entry == "*":
                suffixes.append(())  # every hostname
            elif entry.startswith("*."):
                suffixes.append(tuple(reversed(entry[2:].split("."))))
            else:
                names.add(entry)
        return cls(tuple(networks), frozenset(names), tuple(suffixes))

    def match_address(self, address: IPAddress) -> IPNetwork | None:
        for network in self.networks:
            if address.version == network.version and address in network:
                return network
        return None

    def match_name(self, hostname: str) -> str | None:
        name = hostname.lower().removesuffix(".")
        if name in self.names:
            return name
        labels = tuple(reversed(name.split(".")))
        for suffix in self.suffixes:
            # A wildcard matches names strictly below the domain, compared whole label by label.
            if len(labels) > len(suffix) and labels[: len(suffix)] == suffix:
                return "*." + ".".join(reversed(suffix))
        return None


class TargetPolicy:
    def __init__(self, allow: Iterable[str] = (), deny: Iterable[str] = ()) -> None:
        self.allow = _Rules.parse(allow)
        self.deny = _Rules.parse(deny)

    def check_hostname(self, hostname: str) -> bool:
        """Raise when the name itself is denied; True when the name is explicitly allowed."""
        matched = self.deny.match_name(hostname)
        if matched is not None:
            raise TargetDenied(f"{hostname} is denied by the target policy ({matched})")
        return self.allow.match_name(hostname) is not None

    def check_address(self, address: str | IPAddress, *, name_allowed: bool = False) -> None:
        """Raise :class:`TargetDenied` unless this address may be scanned."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        denied = self.deny.match_address(ip)
        if denied is not None:
            raise TargetDenied(f"{ip} is denied by the target policy ({denied})")
        if name_allowed or self.allow.match_address(ip) is not None:
            return
        for reason, network in DEFAULT_DENY:
            if ip.version == network.version and ip in network:
                raise TargetDenied(f"{ip} is a {reason} address, denied by default")

    def check_network(self, network: IPNetwork) -> None:
        from shared.targets import network_hosts

        for host in network_hosts(network):
            self.check_address(host)
