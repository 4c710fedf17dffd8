"""Lifecycle test helpers: results, a private Redis, silent listeners, a worker's children."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID

import redis

from bench._stack import free_port
from shared.schemas import ScanResult


@contextmanager
def private_redis(log: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A redis-server of this test alone on a free loopback port: (its URL, its process), so a
    test may stop it without touching the machine's shared Redis."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    redis.Redis.from_url(url).ping()
                    break
                except redis.ConnectionError:
                    assert process.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, "private redis-server did not start"
                    time.sleep(0.05)
            yield url, process
        finally:
            if process.poll() is None:
                process.terminate()
                process.wait(10)


@contextmanager
def silent_listeners(addresses: list[str]) -> Iterator[int]:
    """One listener on the same port at each loopback address, that accepts and never speaks:
    service identification waits its whole time on each. Yields the port."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(20):
            port = free_port()
            try:
                for address in addresses:
                    sockets.append(socket.create_server((address, port)))
                break
            except OSError:
                for sock in sockets:
                    sock.close()
                sockets.clear()
        assert sockets, "no common free port"
        yield port
    finally:
        for sock in sockets:
            sock.close()


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (a worker's prefork pool)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def kill_children(pid: int) -> int:
    """SIGKILL every child of ``pid`` (a process the test started); returns how many."""
    killed = 0
    for child in children(pid):
        try:
            os.kill(child, signal.SIGKILL)
            killed += 1
        except ProcessLookupError:
            pass
    return killed


NOW = datetime(2026, 12, 2, tzinfo=UTC)


def scan_result(scan_id: UUID, status: str = "completed") -> ScanResult:
    return ScanResult.model_validate(
        {
            "scan_id": scan_id,
            "target": "127.0.0.1",
            "ports": "1",
            "total_ports_scanned": 1,
            "open_ports": [],
            "status": status,
            "started_at": NOW,
            "finished_at": NOW,
            "duration_seconds": 0.0,
        }
    )


def worker_processes(queue_prefix: str) -> list[int]:
    """Every process of the worker serving ``queue_prefix``: its main process and, in prefork,
    its pool's children (which inherit its command line and environment)."""
    wanted = f"CYBERSEC_QUEUE_PREFIX={queue_prefix}".encode()
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if b"worker_service" in command and wanted in environ:
            found.append(int(entry.name))
    return found
