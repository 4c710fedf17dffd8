"""Fixtures that give each test run its own database, queues and Redis key prefix.

Everything talks to the real PostgreSQL, Redis and RabbitMQ on this machine; a run's names all
carry one random id, so two runs never collide, and everything is removed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import aio_pika
import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from bench._stack import free_port, settings_env
from bench._stack import silent_port as silent_listener
from shared.migrate import drop_database, migrate
from shared.settings import Settings
from shared.store import ScanStore, create_pool

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Fault tests stop and restart the machine's services: run them after everything else."""
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("faults") is not None)


@pytest.fixture(scope="session")
def run_id() -> str:
    return secrets.token_hex(4)


@pytest.fixture(scope="session")
def run_dir(run_id: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=f"cybersec-test-{run_id}-") as path:
        yield Path(path)


@pytest.fixture(scope="session")
def settings(run_id: str, run_dir: Path) -> Settings:
    base = Settings()
    database = base.database_url.rsplit("/", 1)[0] + f"/cybersec_test_{run_id}"
    return base.model_copy(
        update={
            "database_url": database,
            "queue_prefix": f"test-{run_id}",
            "redis_prefix": f"test-{run_id}:",
            "api_port": free_port(),
            "heartbeat_file": str(run_dir / "worker.heartbeat"),
            "metrics_port": 0,
            "publish_timeout": 3.0,
            "api_keys": (secrets.token_urlsafe(24), secrets.token_urlsafe(24)),
            "target_allow": ("127.0.0.0/8", "::1"),
            "target_deny": ("127.0.0.66",),
            "rate_limit_per_minute": 1000,
            "max_active_scans": 50,
        }
    )


@pytest.fixture(scope="session")
def api_key(settings: Settings) -> str:
    """The first key registered from CYBERSEC_API_KEYS."""
    return settings.api_keys[0]


@pytest.fixture(scope="session")
def other_api_key(settings: Settings) -> str:
    return settings.api_keys[1]


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="session")
async def database(settings: Settings) -> AsyncIterator[str]:
    await migrate(settings.database_url)
    yield settings.database_url
    await drop_database(settings.database_url)


@pytest.fixture(scope="session")
async def store(database: str) -> AsyncIterator[ScanStore]:
    pool = await create_pool(database, max_size=4)
    yield ScanStore(pool)
    # The fault tests restart PostgreSQL, so the pool's connections may be gone by now.
    try:
        await asyncio.wait_for(pool.close(), timeout=10)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        pool.terminate()


@pytest.fixture(scope="session")
async def redis_client(settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(settings.redis_url)
    yield client
    await client.aclose()
    # A fresh client: the fault tests restart Redis, which closes the one above.
    cleanup = aioredis.Redis.from_url(settings.redis_url)
    keys = [key async for key in cleanup.scan_iter(match=f"{settings.redis_prefix}*", count=500)]
    if keys:
        await cleanup.delete(*keys)
    await cleanup.aclose()


@pytest.fixture(scope="session")
async def broker_cleanup(settings: Settings) -> AsyncIterator[None]:
    yield
    await delete_queues(settings)


class Process:
    """A child process of the test run, stopped with SIGTERM (then SIGKILL) at teardown."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._log_file = log.open("wb")
        # A session of its own, so ``discard`` reaches the processes it forks (Celery's pool).
        self.popen = subprocess.Popen(
            args,
            env=env,
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 30) -> int:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._log_file.close()
        return self.popen.returncode

    def discard(self) -> None:
        """SIGKILL the process and every process it forked, for a teardown that asserts nothing
        of the shutdown (tested on its own): an idle Celery worker takes ~1.7 s to stop."""
        # Even when the leader has exited (the processes it forked may still be there), as long
        # as it is not reaped yet: until then its pid, the group's id, cannot be reused.
        if self.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)
        self._log_file.close()


def wait_until(predicate: object, what: str, process: Process, timeout: float = 30) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            pytest.fail(f"{what}: process exited early:\n{process.output()[-4000:]}")
        if predicate():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} not ready within {timeout}s:\n{process.output()[-4000:]}")


def start_worker(
    settings: Settings,
    log: Path,
    *,
    wrap: list[str] | None = None,
    concurrency: int = 2,
    pool: Literal["prefork", "threads"] | None = None,
) -> Process:
    """A real Celery worker on the settings' queue, once its heartbeat shows: ``concurrency``
    processes (prefork), or one process running that many scans (``pool="threads"``; the
    settings' ``worker_pool`` when no pool is given)."""
    if pool is not None:
        settings = settings.model_copy(update={"worker_pool": pool})
    heartbeat = Path(settings.heartbeat_file)
    heartbeat.unlink(missing_ok=True)
    args = [
        *(wrap or []),
        sys.executable,
        "-m",
        "worker_service",
        f"--concurrency={concurrency}",
        "--without-mingle",
        "--without-gossip",
    ]
    process = Process(args, settings_env(settings), log)
    wait_until(heartbeat.exists, "worker heartbeat", process)
    return process


def start_api(settings: Settings, log: Path, *, wrap: list[str] | None = None) -> Process:
    """The gateway under uvicorn as a separate process, once /readyz answers 200."""
    base_url = f"http://{settings.api_host}:{settings.api_port}"
    process = Process(
        [*(wrap or []), sys.executable, "-m", "api_service"], settings_env(settings), log
    )

    def ready() -> bool:
        try:
            return httpx.get(f"{base_url}/readyz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, "API /readyz", process)
    return process


def base_url(settings: Settings) -> str:
    return f"http://{settings.api_host}:{settings.api_port}"


@pytest.fixture(scope="session")
def worker(
    settings: Settings, database: str, run_dir: Path, broker_cleanup: None, redis_client: object
) -> Iterator[Process]:
    """A real Celery worker (prefork, 2 processes) on this run's queue."""
    process = start_worker(settings, run_dir / "worker.log")
    yield process
    process.discard()


@pytest.fixture(scope="session")
def api(settings: Settings, database: str, run_dir: Path, broker_cleanup: None) -> Iterator[str]:
    """The gateway under uvicorn as a separate process; yields its base URL."""
    process = start_api(settings, run_dir / "api.log")
    yield base_url(settings)
    process.stop()


def variant(settings: Settings, name: str, run_dir: Path, **changes: object) -> Settings:
    """Settings for an extra stack of this run: same database, its own queue and API port."""
    update: dict[str, object] = {
        "queue_prefix": f"{settings.queue_prefix}-{name}",
        "api_port": free_port(),
        "heartbeat_file": str(run_dir / f"{name}.heartbeat"),
    }
    update.update(changes)
    return settings.model_copy(update=update)


@contextmanager
def own_stack(
    settings: Settings,
    run_dir: Path,
    name: str,
    *,
    workers: int = 0,
    wrap_api: list[str] | None = None,
    wrap_worker: list[str] | None = None,
    **changes: object,
) -> Iterator[Settings]:
    """A gateway (and ``workers`` worker processes, if any) of their own: same database, their
    own queues, removed at the end."""
    own = variant(settings, name, run_dir, **changes)
    api = start_api(own, run_dir / f"api-{name}.log", wrap=wrap_api)
    worker = None
    try:
        if workers:
            worker = start_worker(
                own, run_dir / f"worker-{name}.log", wrap=wrap_worker, concurrency=workers
            )
        yield own
    finally:
        if worker is not None:
            worker.discard()
        api.stop()
        asyncio.run(delete_queues(own))


FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")


def wait_final(client: httpx.Client, task_id: str, timeout: float = 30) -> dict[str, Any]:
    """Poll a scan's status until it ends; fails the test at the deadline."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = client.get(f"/api/scan/{task_id}").json()
        if body.get("state") in FINAL_STATES:
            return body
        time.sleep(0.05)
    pytest.fail(f"scan {task_id} did not end within {timeout}s: {body}")


async def delete_queues(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.broker_url)
    async with connection:
        channel = await connection.channel()
        for queue in (settings.scan_queue, settings.critical_queue, settings.dead_letter_queue):
            await channel.queue_delete(queue)


@pytest.fixture
def listeners() -> Iterator[list[int]]:
    """Five listening sockets on 127.0.0.1 in a small window of ports."""
    sockets: list[socket.socket] = []
    try:
        first = socket.create_server(("127.0.0.1", 0))
        sockets.append(first)
        base = first.getsockname()[1]
        for port in range(base + 2, base + 40, 3):
            if len(sockets) == 5:
                break
            try:
                sockets.append(socket.create_server(("127.0.0.1", port)))
            except OSError:
                continue
        yield sorted(s.getsockname()[1] for s in sockets)
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that never answers a SYN: a listener whose accept queue is full."""
    with silent_listener() as port:
        yield port


@pytest.fixture
def client(api: str, api_key: str) -> Iterator[httpx.Client]:
    """An HTTP client of the running API, authenticated with the run's first key."""
    with httpx.Client(base_url=api, timeout=10, headers=auth(api_key)) as c:
        yield c


@pytest.fixture
async def aclient(api: str, api_key: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=api, timeout=10, headers=auth(api_key)) as c:
        yield c
