"""Turn a target into the addresses to connect to, checking each against the target policy.

The gateway calls this to refuse early; the worker calls it again on its own resolution, so a
name that resolves differently by the time the scan runs (DNS rebinding) is still refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

from shared.errors import ResolutionFailed
from shared.policy import TargetPolicy
from shared.targets import Target, network_hosts


async def resolve_target(target: Target, policy: TargetPolicy, *, timeout: float) -> list[str]:
    """Every address the target stands for, in scan order; raises TargetDenied or
    ResolutionFailed."""
    if target.kind == "ip":
        policy.check_address(target.value)
        return [target.value]
    if target.kind == "network":
        hosts = network_hosts(ipaddress.ip_network(target.value))
        for host in hosts:
            policy.check_address(host)
        return [str(host) for host in hosts]
    name_allowed = policy.check_hostname(target.value)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            infos = await loop.getaddrinfo(target.value, None, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise ResolutionFailed(f"{target.value} did not resolve within {timeout}s") from None
    except socket.gaierror as exc:
        raise ResolutionFailed(f"{target.value} does not resolve: {exc.strerror}") from None
    addresses = sorted({str(info[4][0]) for info in infos}, key=lambda a: (":" in a, a))
    if not addresses:
        raise ResolutionFailed(f"{target.value} resolved to no address")
    for address in addresses:
        policy.check_address(address, name_allowed=name_allowed)
    return addresses
