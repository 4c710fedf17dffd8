"""Is the host up: TCP connect pings, and ICMP echo where this process may send it.

As nmap does unprivileged: a connect to 80 or 443 that is answered, by a SYN-ACK or by a
reset, says the host is up. ICMP echo goes out too when the process may: through a ping socket
(``SOCK_DGRAM``, allowed by ``net.ipv4.ping_group_range``, which covers ICMPv6 too) or a raw
socket (``CAP_NET_RAW``); with neither, TCP alone decides. IPv4 hosts get ICMP echo, IPv6 hosts
ICMPv6 echo. Unanswered pings are retransmitted like port probes, so a lost SYN does not mark
a live host down.
"""

from __future__ import annotations

import _socket as socket
import contextlib
import secrets
import time

from worker_service.probe.scheduler import Scheduler

TYPE_CHECKING = False
if TYPE_CHECKING:
    import threading
    from collections.abc import Sequence
    from typing import Final

    from worker_service.probe.timing import TokenBucket

PING_PORTS: Final = (80, 443)
"""nmap's unprivileged default TCP ping ports."""
_ECHO_REQUEST, _ECHO_REPLY = 8, 0
_ECHO6_REQUEST, _ECHO6_REPLY = 128, 129


class HostState:
    """What discovery learned of one address: up or down, why, and its first RTT estimate."""

    __slots__ = ("reason", "seed", "up")

    def __init__(self, up: bool, reason: str, seed: tuple[float, float] | None = None) -> None:
        self.up = up
        self.reason = reason
        self.seed = seed

    def __repr__(self) -> str:
        return f"HostState({self.up!r}, {self.reason!r})"


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of ``data``."""
    if len(data) % 2:
        data += b"\x00"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def echo_request(ident: int, seq: int, v6: bool = False) -> bytes:
    """An echo request; ICMPv6's checksum covers a pseudo-header the kernel fills in, so it
    is left 0 for the kernel to compute (RFC 3542 says it must, on raw ICMPv6 sockets too)."""
    body = b"cybersec-scan"
    kind = _ECHO6_REQUEST if v6 else _ECHO_REQUEST
    header = bytes([kind, 0, 0, 0]) + ident.to_bytes(2, "big") + seq.to_bytes(2, "big")
    if v6:
        return header + body
    sum_ = checksum(header + body)
    return header[:2] + sum_.to_bytes(2, "big") + header[4:] + body


class Pinger:
    """An ICMP (or ICMPv6) echo socket this process may use: a ping socket or a raw one."""

    def __init__(self, sock: socket.socket, raw: bool, v6: bool) -> None:
        self.sock = sock
        self.raw = raw
        self.v6 = v6

    def send(self, address: str, ident: int, seq: int) -> None:
        self.sock.sendto(echo_request(ident, seq, self.v6), (address, 0))

    def replies(self, ident: int) -> set[str]:
        """Addresses whose echo replies wait on the socket."""
        answered: set[str] = set()
        reply = _ECHO6_REPLY if self.v6 else _ECHO_REPLY
        while True:
            try:
                data, source = self.sock.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return answered
            if self.raw:
                if not self.v6:  # raw IPv4 sockets read the IP header too; IPv6 ones do not
                    data = data[(data[0] & 0x0F) * 4 :]
                if len(data) < 8 or int.from_bytes(data[4:6], "big") != ident:
                    continue  # someone else's ping, or not a reply to ours
            if data and data[0] == reply:
                answered.add(source[0])

    def close(self) -> None:
        self.sock.close()


def open_icmp(v6: bool = False) -> Pinger | None:
    """An echo socket this process may use; None when neither kind is allowed (no ping
    group, no CAP_NET_RAW) or the family is not there (a kernel without IPv6)."""
    family, proto = (
        (socket.AF_INET6, socket.IPPROTO_ICMPV6) if v6 else (socket.AF_INET, socket.IPPROTO_ICMP)
    )
    for kind, raw in ((socket.SOCK_DGRAM, False), (socket.SOCK_RAW, True)):
        try:
            sock = socket.socket(family, kind | socket.SOCK_NONBLOCK, proto)
        except OSError:
            continue
        return Pinger(sock, raw, v6)
    return None


PACE_SLICE = 0.05
"""Longest single sleep while paced: a stop is seen within it."""


def _pace(bucket: TokenBucket | None, stop: threading.Event | None = None) -> bool:
    """Wait for the scan's rate to allow one more packet (echoes count against it too);
    False, at once, when ``stop`` is set (before or while waiting)."""
    if stop is not None and stop.is_set():
        return False
    if bucket is None:
        return True
    while wait := bucket.take(time.monotonic()):
        if stop is None:
            time.sleep(wait)
        elif stop.wait(min(wait, PACE_SLICE)):
            return False
    return True


def discover(
    hosts: Sequence[str],
    *,
    timeout: float,
    retries: int,
    inflight: int,
    min_timeout: float,
    bucket: TokenBucket | None = None,
    icmp: bool = True,
    stop: threading.Event | None = None,
) -> dict[str, HostState]:
    """Ping every host (TCP to ``PING_PORTS``, ICMP echo where allowed); a host is up on
    ``syn-ack``, ``reset`` or ``echo-reply``, else down with ``no-response`` (or the ICMP
    error the network sent back, e.g. ``host-unreach``)."""
    # Its own identifier: several scans of one process (the threads pool) ping at once, and a
    # raw socket reads every echo reply of the host.
    ident = secrets.randbits(16)
    pingers: list[tuple[Pinger, list[str]]] = []
    if icmp:
        for v6 in (False, True):
            family = [address for address in hosts if (":" in address) == v6]
            if family and (pinger := open_icmp(v6)) is not None:
                pingers.append((pinger, family))
    pinged = sum(len(family) for _, family in pingers)
    try:
        for seq in range(1 + max(0, retries)):
            for pinger, family in pingers:
                for address in family:
                    if not _pace(bucket, stop):
                        break
                    # A full send buffer or an unroutable address: TCP still decides.
                    with contextlib.suppress(OSError):
                        pinger.send(address, ident, seq)
        scheduler = Scheduler(
            timeout=timeout,
            min_timeout=min_timeout,
            retries=retries,
            inflight=inflight,
            bucket=bucket,
            stop=stop,
        )
        notable = scheduler.run(hosts, PING_PORTS)
        echoed: set[str] = set()
        if pingers:
            deadline = time.monotonic() + min(timeout, 0.05)
            while time.monotonic() < deadline and len(echoed) < pinged:
                for pinger, family in pingers:
                    echoed |= pinger.replies(ident) & set(family)
                time.sleep(0.005)
        states = {}
        for address in hosts:
            timing = scheduler.timing[address]
            seed = timing.state if timing.srtt >= 0 else None
            outcomes = [notable.get((address, port)) for port in PING_PORTS]
            if any(o is not None and o[0] == "open" for o in outcomes):
                states[address] = HostState(True, "syn-ack", seed)
            elif any(o is None for o in outcomes):
                states[address] = HostState(True, "reset", seed)
            elif address in echoed:
                states[address] = HostState(True, "echo-reply")
            else:
                reasons = {o[1] for o in outcomes if o is not None}
                reasons.discard("no-response")
                states[address] = HostState(False, min(reasons) if reasons else "no-response")
        return states
    finally:
        for pinger, _family in pingers:
            pinger.close()
