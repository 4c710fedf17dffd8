"""``cybersec dev``: check the services, migrate, and run the API and one worker until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from rich.console import Console

from shared.keys import generate_key
from shared.migrate import migrate
from shared.settings import ENV_PREFIX, Settings

START_HINTS = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect"
    " $(ls /etc/postgresql | sort -V | tail -1) main start",
    "Redis": 'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
    "RabbitMQ": "rabbitmq-server -detached",
}


def unreachable_services(settings: Settings) -> list[tuple[str, str]]:
    """(name, address) of every dependency that refuses a TCP connection."""
    missing = []
    for name, url, default_port in (
        ("PostgreSQL", settings.database_url, 5432),
        ("Redis", settings.redis_url, 6379),
        ("RabbitMQ", settings.broker_url, 5672),
    ):
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or default_port
        try:
            socket.create_connection((host, port), timeout=2).close()
        except OSError:
            missing.append((name, f"{host}:{port}"))
    return missing


def run_dev(settings: Settings, console: Console, api_key: str) -> int:
    missing = unreachable_services(settings)
    for name, address in missing:
        console.print(f"[red]{name} is not reachable at {address}.[/red] Start it with:")
        console.print(f"    {START_HINTS[name]}")
    if missing:
        return 2
    applied = asyncio.run(migrate(settings.database_url))
    console.print(f"migrations applied: {', '.join(applied) or 'none pending'}")
    env = dict(os.environ)
    # Own sessions: a terminal's Ctrl-C reaches only this process, which stops each child once.
    children = [
        subprocess.Popen([sys.executable, "-m", "api_service"], env=env, start_new_session=True),
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker_service",
                f"--concurrency={settings.worker_concurrency}",
            ],
            env=env,
        ),
        # The reserved critical node (issue 15): critical scans start while long ones hold
        # every process of the worker above.
        subprocess.Popen([sys.executable, "-m", "worker_service", "--critical"], env=env),
        # Schedules and webhooks (issue 17).
        subprocess.Popen(
            [sys.executable, "-m", "api_service.dispatcher"], env=env, start_new_session=True
        ),
    ]
    base = f"http://{settings.api_host}:{settings.api_port}"
    console.print(
        f"API on {base}, one worker on queue {settings.scan_queue}, one reserved worker on"
        f" {settings.critical_queue}, one dispatcher."
        " Ctrl-C stops them.\n"
        f"Development API key: [bold]{api_key}[/bold]\nTry:\n"
        f"  curl -s -X POST {base}/api/scan -H 'authorization: Bearer {api_key}' "
        '-H \'content-type: application/json\' -d \'{"target":"127.0.0.1","ports":"1-1000"}\'',
        highlight=False,
        soft_wrap=True,
    )
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while not stopping and all(child.poll() is None for child in children):
        time.sleep(0.2)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.shutdown_timeout + 5
    for child in children:
        try:
            child.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
    console.print("stopped")
    return 0 if stopping else 1


DEV_KEY_FILE = Path(".run/dev-api-key")


def dev_environment() -> str:
    """Development defaults for settings the user did not set; returns the API key to use.

    The key is made once and kept in ``.run/dev-api-key`` (git ignores ``.run/``), so
    restarts keep working with the same key. Scans of 127.0.0.0/8 and ::1 are allowed, and
    webhooks to receivers there.
    """
    os.environ.setdefault(f"{ENV_PREFIX}TARGET_ALLOW", "127.0.0.0/8,::1")
    os.environ.setdefault(f"{ENV_PREFIX}LOG_FORMAT", "text")
    os.environ.setdefault(f"{ENV_PREFIX}WEBHOOK_ALLOW_NETWORKS", "127.0.0.0/8,::1")
    configured = os.environ.get(f"{ENV_PREFIX}API_KEYS", "").strip()
    if configured:
        return configured.split(",")[0].strip()
    if DEV_KEY_FILE.exists():
        key = DEV_KEY_FILE.read_text().strip()
    else:
        key = generate_key()
        DEV_KEY_FILE.parent.mkdir(parents=True, exist_ok=True)
        DEV_KEY_FILE.write_text(key + "\n")
        DEV_KEY_FILE.chmod(0o600)
    os.environ[f"{ENV_PREFIX}API_KEYS"] = key
    return key
