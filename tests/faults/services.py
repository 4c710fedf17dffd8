"""Stop and start this machine's services with their own commands, waiting until each
answers again; every test that stops one starts it again, even when it fails."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

PG_VERSION = sorted(os.listdir("/etc/postgresql"))[-1] if os.path.isdir("/etc/postgresql") else ""


def _run(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=120)


def port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def wait_port(port: int, up: bool, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_open(port) == up:
            return
        time.sleep(0.2)
    raise TimeoutError(f"port {port} did not go {'up' if up else 'down'} in {timeout}s")


def stop_rabbitmq() -> None:
    _run("rabbitmqctl", "stop_app")
    wait_port(5672, up=False)


def start_rabbitmq() -> None:
    _run("rabbitmqctl", "start_app")
    wait_port(5672, up=True)


def stop_postgres() -> None:
    _run("pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, "main", "stop", "-m", "fast")
    wait_port(5432, up=False)


def start_postgres() -> None:
    _run("pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, "main", "start")
    wait_port(5432, up=True)


def stop_redis() -> None:
    subprocess.run(
        ["redis-cli", "shutdown", "nosave"], capture_output=True, timeout=30, check=False
    )
    wait_port(6379, up=False)


def start_redis() -> None:
    _run(
        "redis-server",
        "--daemonize",
        "yes",
        "--bind",
        "127.0.0.1",
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
    )
    wait_port(6379, up=True)


@contextmanager
def outage(stop: object, start: object) -> Iterator[None]:
    assert callable(stop)
    assert callable(start)
    stop()
    try:
        yield
    finally:
        start()
