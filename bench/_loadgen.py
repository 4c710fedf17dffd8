"""A small HTTP/1.1 load generator, run as its own process so it never shares the server's core.

``python -m bench._loadgen --port P --path /api/scan --body '{...}' --header 'K: V'
--connections 64 --duration 10 --max-requests 50000 [--rate 200]``

Keep-alive connections speak raw HTTP/1.1 over uvloop: parsing a response costs a few
microseconds, so on 2 cores the generator leaves the CPU to the server (it reports its own CPU
time to prove it). Without ``--rate`` it is a closed loop (each connection sends its next request
when the answer arrives: saturation). With ``--rate`` it is an open loop: request *i* is due at
``i / rate`` and its latency counts from then, so a slow server cannot hide its queueing
(no coordinated omission). It stops by itself at ``--duration`` seconds or ``--max-requests``,
whichever comes first, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import cast

import uvloop


class ResponseError(Exception):
    pass


class HttpConnection(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ResponseError(f"connection lost: {exc!r}"))
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        marker = head.find(b"content-length:")
        if marker < 0:
            self._fail("response without content-length")
            return
        line_end = head.find(b"\r\n", marker)
        length = int(head[marker + 15 : line_end if line_end >= 0 else len(head)])
        total = end + 4 + length
        if len(self.buffer) < total:
            return
        status = int(self.buffer[9:12])
        del self.buffer[:total]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def _fail(self, why: str) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ResponseError(why))

    async def request(self, raw: bytes) -> int:
        if self.transport is None:
            raise ResponseError("connection closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        status: int = await self.waiter
        return status


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    errors: int = 0

    def record(self, status: int, latency: float) -> None:
        key = str(status)
        self.statuses[key] = self.statuses.get(key, 0) + 1
        if 200 <= status < 300:
            self.latencies.append(latency)


def build_request(args: argparse.Namespace) -> bytes:
    body: bytes = str(args.body).encode()
    lines = [
        f"{args.method} {args.path} HTTP/1.1",
        f"Host: {args.host}:{args.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *args.header,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def connect(args: argparse.Namespace) -> list[HttpConnection]:
    loop = asyncio.get_running_loop()
    conns: list[HttpConnection] = []
    for _ in range(args.connections):
        _transport, protocol = await loop.create_connection(HttpConnection, args.host, args.port)
        conns.append(protocol)
    return conns


async def closed_loop(args: argparse.Namespace, raw: bytes, tally: Tally) -> None:
    conns = await connect(args)
    end = time.monotonic() + args.duration
    budget = [args.max_requests]

    async def drive(conn: HttpConnection) -> None:
        while budget[0] > 0 and time.monotonic() < end:
            budget[0] -= 1
            start = time.perf_counter()
            try:
                status = await conn.request(raw)
            except ResponseError:
                tally.errors += 1
                return
            tally.record(status, time.perf_counter() - start)

    await asyncio.gather(*(drive(c) for c in conns))


async def open_loop(args: argparse.Namespace, raw: bytes, tally: Tally) -> None:
    conns = await connect(args)
    idle: asyncio.Queue[HttpConnection] = asyncio.Queue()
    for conn in conns:
        idle.put_nowait(conn)
    total = min(args.max_requests, int(args.rate * args.duration))
    start = time.perf_counter()

    async def one(due: float) -> None:
        conn = await idle.get()
        try:
            status = await conn.request(raw)
        except ResponseError:
            tally.errors += 1
            return
        tally.record(status, time.perf_counter() - due)
        idle.put_nowait(conn)

    tasks: list[asyncio.Task[None]] = []
    for i in range(total):
        due = start + i / args.rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(due)))
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=args.duration + 30)


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def run(args: argparse.Namespace) -> dict[str, object]:
    raw = build_request(args)
    tally = Tally()
    started = time.perf_counter()
    if args.rate:
        await open_loop(args, raw, tally)
    else:
        await closed_loop(args, raw, tally)
    elapsed = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    lat = sorted(tally.latencies)
    return {
        "elapsed": elapsed,
        "ok": len(lat),
        "statuses": tally.statuses,
        "errors": tally.errors,
        "rate": len(lat) / elapsed if elapsed > 0 else 0.0,
        "p50": percentile(lat, 0.50),
        "p90": percentile(lat, 0.90),
        "p99": percentile(lat, 0.99),
        "max": lat[-1] if lat else float("nan"),
        "cpu": usage.ru_utime + usage.ru_stime,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--method", default="POST")
    parser.add_argument("--path", default="/api/scan")
    parser.add_argument("--body", default="")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=0.0)
    args = parser.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("loopback only")
    if args.duration > 120 or args.max_requests > 1_000_000:
        parser.error("bounded: at most 120 s and 1,000,000 requests")
    result = uvloop.run(run(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
