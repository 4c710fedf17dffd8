"""Fixtures for the scan engine: loopback listeners, fixture servers, private network namespaces."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from tests import needs

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
_netns_ids = itertools.count()


@pytest.fixture
def listeners() -> Iterator[Callable[..., list[int]]]:
    """Open listening (or, with listen=False, bound-only and so refusing) loopback ports."""
    opened: list[socket.socket] = []

    def open_ports(count: int, *, listen: bool = True, address: str = "127.0.0.1") -> list[int]:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        ports = []
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            opened.append(sock)
            sock.bind((address, 0))
            if listen:
                sock.listen(64)
            ports.append(sock.getsockname()[1])
        return ports

    yield open_ports
    for sock in opened:
        sock.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[int]]]:
    """Start asyncio fixture servers on 127.0.0.1; each call returns the new server's port."""
    servers: list[asyncio.Server] = []

    async def start(handler: Handler, **kwargs: object) -> int:
        async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # scanners hang up mid-conversation; that is their right
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()

        server = await asyncio.start_server(guarded, "127.0.0.1", 0, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        port: int = server.sockets[0].getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def netns() -> Iterator[str]:
    """A private network namespace with loopback up, deleted afterwards."""
    needs.root_with_iproute2()
    name = f"cybersec-test-{os.getpid()}-{next(_netns_ids)}"
    _ip("netns", "add", name)
    try:
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name
    finally:
        _ip("netns", "del", name)
