"""Turn a target into the addresses to connect to, checking each against the target policy.

The gateway calls this to refuse early; the worker calls it again on its own resolution, so a
name that resolves differently by the time the scan runs (DNS rebinding) is still refused.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

from shared.errors import ResolutionFailed
from shared.policy import TargetPolicy
from shared.targets import Target, network_hosts


async def resolve_target(
    target: Target,
    policy: TargetPolicy,
    *,
    timeout: float,
    lookups: asyncio.Semaphore | None = None,
) -> list[str]:
    """Every address the target stands for, in scan order; raises TargetDenied or
    ResolutionFailed.

    ``lookups`` bounds the host-name lookups in flight (each holds a thread of the loop's
    executor until the resolver answers, even after ``timeout`` gave up on it): waiting for a
    turn counts against ``timeout``."""
    if target.kind == "ip":
        policy.check_address(target.value)
        return [target.value]
    if target.kind == "network":
        hosts = network_hosts(ipaddress.ip_network(target.value))
        for host in hosts:
            policy.check_address(host)
        return [str(host) for host in hosts]
    policy.check_hostname(target.value)
    addresses = await resolve_name(target.value, timeout=timeout, lookups=lookups)
    for address in addresses:
        policy.check_address(address)
    return addresses


async def resolve_name(
    name: str, *, timeout: float, lookups: asyncio.Semaphore | None = None
) -> list[str]:
    """The addresses a host name resolves to (IPv4 first, scope ids dropped), bounded as
    :func:`resolve_target` describes; raises ResolutionFailed."""
    try:
        async with asyncio.timeout(timeout):
            infos = await _getaddrinfo(name, lookups)
    except TimeoutError:
        raise ResolutionFailed(f"{name} did not resolve within {timeout}s") from None
    except (socket.gaierror, UnicodeError) as exc:
        raise ResolutionFailed(f"{name} does not resolve: {exc}") from None
    found = {str(info[4][0]).partition("%")[0] for info in infos}
    addresses = sorted(found, key=lambda a: (":" in a, a))
    if not addresses:
        raise ResolutionFailed(f"{name} resolved to no address")
    return addresses


async def _getaddrinfo(name: str, lookups: asyncio.Semaphore | None) -> list[Any]:
    loop = asyncio.get_running_loop()
    if lookups is None:
        return await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    await lookups.acquire()
    # The turn is given back when the lookup ends, not when its caller stops waiting: a
    # timed-out lookup still holds an executor thread.
    lookup = asyncio.ensure_future(loop.getaddrinfo(name, None, type=socket.SOCK_STREAM))

    def finished(done: asyncio.Future[Any]) -> None:
        lookups.release()
        if not done.cancelled():
            done.exception()  # retrieved: a caller that gave up does not want it logged

    lookup.add_done_callback(finished)
    return await asyncio.shield(lookup)
