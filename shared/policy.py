"""Which addresses a scan may touch. Enforced by the gateway and again by the worker.

Default deny covers loopback, link-local (cloud metadata included), the other clouds' metadata
addresses, multicast, unspecified and reserved space, and the addresses of the host the check
runs on; an IPv6 address that embeds an IPv4 one (NAT64, 6to4, Teredo) is checked as that one
too. Only an address or CIDR ``allow`` entry lifts that default, for what it contains; an allowed
host name never does, whatever it resolves to. ``deny`` entries always win. Entries are CIDRs,
addresses, hostnames, or ``*.domain`` wildcards matched label by label (``*`` alone matches every
hostname).
"""

from __future__ import annotations

import copy
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
        # Alibaba, AWS (IPv6 IMDS) and Azure (WireServer) metadata; GCP's is link-local.
        ("cloud metadata", ("100.100.100.200/32", "fd00:ec2::254/128", "168.63.129.16/32")),
    )
    for cidr in cidrs
)

METADATA: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("169.254.169.254/32"),  # AWS, GCP, Azure IMDS, OpenStack
    *(network for reason, network in DEFAULT_DENY if reason == "cloud metadata"),
)
"""Cloud metadata services: no allow list of any kind may lift these."""

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


def embedded_ipv4(ip: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches through: mapped, NAT64, 6to4, Teredo."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return []
    found: list[ipaddress.IPv4Address] = []
    if ip.ipv4_mapped is not None:
        found.append(ip.ipv4_mapped)
    if any(ip in prefix for prefix in _NAT64):
        found.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if ip.sixtofour is not None:
        found.append(ip.sixtofour)
    if ip.teredo is not None:
        found.extend(ip.teredo)
    return found


def own_addresses() -> frozenset[IPAddress]:
    """The addresses of this host's interfaces (Linux ``/proc``; empty elsewhere)."""
    found: set[IPAddress] = set()
    try:
        with open("/proc/net/fib_trie", encoding="ascii") as trie:
            last = ""
            for line in trie:
                text = line.strip()
                if text.startswith("|-- "):
                    last = text[4:]
                elif text.endswith("host LOCAL") and last:
                    found.add(ipaddress.IPv4Address(last))
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/net/if_inet6", encoding="ascii") as inet6:
            for line in inet6:
                found.add(ipaddress.IPv6Address(int(line.split()[0], 16)))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)


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
    def __init__(
        self,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        *,
        own: Iterable[IPAddress] | None = None,
    ) -> None:
        """``own``: this host's addresses, denied by default (read from the host if None)."""
        self.allow = _Rules.parse(allow)
        self.deny = _Rules.parse(deny)
        self.own = frozenset(own_addresses() if own is None else own)

    def check_hostname(self, hostname: str) -> None:
        """Raise when the name itself is denied. An allowed name lifts nothing: each address
        it resolves to is checked on its own."""
        matched = self.deny.match_name(hostname)
        if matched is not None:
            raise TargetDenied(f"{hostname} is denied by the target policy ({matched})")

    def check_address(self, address: str | IPAddress) -> None:
        """Raise :class:`TargetDenied` unless this address may be scanned."""
        ip = ipaddress.ip_address(address) if isinstance(address, str) else address
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for candidate in (ip, *embedded_ipv4(ip)):
            self._check_one(candidate)

    def _check_one(self, ip: IPAddress) -> None:
        denied = self.deny.match_address(ip)
        if denied is not None:
            raise TargetDenied(f"{ip} is denied by the target policy ({denied})")
        if self.allow.match_address(ip) is not None:
            return
        for reason, network in DEFAULT_DENY:
            if ip.version == network.version and ip in network:
                raise TargetDenied(f"{ip} is a {reason} address, denied by default")
        if ip in self.own:
            raise TargetDenied(f"{ip} is an address of this host, denied by default")

    def excluding(self, exclude: Iterable[str]) -> TargetPolicy:
        """This policy with a scan's own exclusions (its payload's ``exclude``) as deny
        entries; ``self`` when there are none."""
        networks = exclusion_networks(exclude)
        if not networks:
            return self
        narrowed = copy.copy(self)
        narrowed.deny = _Rules(
            (*self.deny.networks, *networks), self.deny.names, self.deny.suffixes
        )
        return narrowed

    def check_network(self, network: IPNetwork) -> None:
        from shared.targets import network_hosts

        for host in network_hosts(network):
            self.check_address(host)


def exclusion_networks(exclude: Iterable[str]) -> tuple[IPNetwork, ...]:
    """A scan's own exclusions (addresses and CIDR blocks, as a schedule carries them in its
    task payload's ``exclude``) as deny networks."""
    return _Rules.parse(exclude).networks


def excluded_by(address: IPAddress, exclude: Iterable[str]) -> IPNetwork | None:
    """The exclusion that holds ``address`` (or an IPv4 address it embeds), or None."""
    for network in exclusion_networks(exclude):
        for candidate in (address, *embedded_ipv4(address)):
            if candidate.version == network.version and candidate in network:
                return network
    return None
