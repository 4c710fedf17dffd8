"""What a scan may point at: an IP address, a hostname or a bounded CIDR block."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Literal

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_ZONE = re.compile(r"[A-Za-z0-9_.-]{1,15}")
"""An IPv6 zone: an interface name (at most 15 characters on Linux) or index."""
DEFAULT_MAX_HOSTS = 256
MAX_HOSTS_LIMIT = 65_536
"""The most addresses any configuration may allow in one scan (``CYBERSEC_MAX_HOSTS``)."""


class TargetError(ValueError):
    """A target that is neither an IP address, a hostname nor an acceptable network."""


@dataclass(frozen=True, slots=True)
class Target:
    kind: Literal["ip", "hostname", "network"]
    value: str
    """Canonical text: compressed IP, lower-case hostname without trailing dot, network CIDR."""


def parse_target(text: str, *, max_hosts: int = DEFAULT_MAX_HOSTS) -> Target:
    """Classify and canonicalise a target; raises :class:`TargetError` when it is neither."""
    raw = text.strip()
    if not raw:
        raise TargetError("target is empty")
    _, percent, zone = raw.partition("%")
    if percent and not _ZONE.fullmatch(zone.partition("/")[0]):
        raise TargetError(f"{raw!r} has a zone that is not an interface name")
    try:
        return Target("ip", str(ipaddress.ip_address(raw)))
    except ValueError:
        pass
    if "/" in raw:
        try:
            network = ipaddress.ip_network(raw, strict=False)
        except ValueError as exc:
            raise TargetError(f"{raw!r} is not a valid CIDR block") from exc
        if network.num_addresses > max_hosts:
            raise TargetError(
                f"network {network} has {network.num_addresses} addresses; the bound is {max_hosts}"
            )
        return Target("network", str(network))
    name = raw.lower().removesuffix(".")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise TargetError(f"{raw!r} is neither an IP address nor a hostname")
    if labels[-1].isdigit():
        raise TargetError(f"{raw!r} is neither an IP address nor a hostname")
    return Target("hostname", name)


def network_hosts(network: IPNetwork) -> list[IPAddress]:
    """Addresses to scan in a block: the usable hosts, or the single address of a /32 or /128."""
    hosts: list[IPAddress] = [*network.hosts()]
    return hosts or [network.network_address]
