"""An isolated stack for the service benchmarks, and everything needed to remove it again.

One run id names everything the benchmarks create: the database ``cybersec_bench_<id>``, queues
``bench-<id>*.scans*``, Redis keys under ``bench-<id>``, and a temporary directory for logs and
heartbeats. Child processes start in their own session, so stopping one stops exactly the
processes it started (its Celery pool children and shard processes included) and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import httpx
import redis.asyncio as aioredis

from shared.migrate import drop_database, migrate
from shared.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process read exactly these settings."""
    return {**settings.child_environ(os.environ), "PYTHONUNBUFFERED": "1"}


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port that never answers a SYN: a listener whose accept queue is full."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    try:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port: int = server.getsockname()[1]
        # Linux queues backlog + 1 connections; once full, further SYNs are dropped silently.
        for _ in range(2):
            filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.1)
        yield port
    finally:
        for sock in fillers:
            sock.close()
        server.close()


class Child:
    """A process the benchmark started, in its own session; ``stop`` ends its whole group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._log_file = log.open("ab")
        self.popen = subprocess.Popen(
            args,
            env=env,
            cwd=ROOT,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-tail:]

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        # Whatever is left of the group it led (pool children, shard processes) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        self._log_file.close()


class AcceptingListener:
    """Listening loopback ports whose connections are accepted and closed at once, in a thread.

    Scans connect to them many times; without accepting, the backlog fills and the port would
    turn silent (filtered) after a few hundred scans.
    """

    def __init__(self, count: int) -> None:
        self.sockets: list[socket.socket] = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(4096)
            sock.settimeout(0.2)
            self.sockets.append(sock)
        self.ports = [s.getsockname()[1] for s in self.sockets]
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._serve, args=(s,), daemon=True) for s in self.sockets
        ]
        for thread in self._threads:
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _peer = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(2)
        for sock in self.sockets:
            sock.close()


@dataclass
class Stack:
    """The run's names and resources; ``teardown`` removes all of them."""

    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    children: list[Child] = field(default_factory=list)
    queues: set[str] = field(default_factory=set)
    listeners: list[AcceptingListener] = field(default_factory=list)
    migrated: bool = False

    def __post_init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"cybersec-bench-{self.run_id}-"))
        base = Settings()
        self.settings = base.model_copy(
            update={
                "database_url": base.database_url.rsplit("/", 1)[0]
                + f"/cybersec_bench_{self.run_id}",
                "queue_prefix": f"bench-{self.run_id}",
                "redis_prefix": f"bench-{self.run_id}:",
                "api_port": free_port(),
                "heartbeat_file": str(self.dir / "worker.heartbeat"),
                "metrics_port": 0,
                "api_keys": (secrets.token_urlsafe(24),),
                "target_allow": ("127.0.0.0/8", "::1"),
                "rate_limit_per_minute": 100_000_000,
                "max_active_scans": 100_000_000,
            }
        )
        self.queues.update(
            {
                self.settings.scan_queue,
                self.settings.critical_queue,
                self.settings.dead_letter_queue,
            }
        )

    @property
    def api_key(self) -> str:
        return self.settings.api_keys[0]

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.api_port}"

    def queue_pair(self, tag: str) -> tuple[str, str]:
        """(scan queue, dead-letter queue) of a reference component, registered for cleanup."""
        queue = f"bench-{self.run_id}-{tag}.scans"
        dead = f"{queue}.dead"
        self.queues.update({queue, dead})
        return queue, dead

    async def setup(self) -> None:
        await migrate(self.settings.database_url)
        self.migrated = True

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Child:
        child = Child(name, [sys.executable, *args], env, self.dir / f"{name}.log")
        self.children.append(child)
        return child

    def stop(self, child: Child, timeout: float = 30.0) -> None:
        child.stop(timeout)
        if child in self.children:
            self.children.remove(child)

    async def start_api(self, settings: Settings | None = None) -> Child:
        settings = settings or self.settings
        child = self.start("api", ["-m", "api_service"], settings_env(settings))
        await wait_http(child, f"http://127.0.0.1:{settings.api_port}/readyz", 200)
        return child

    async def start_worker(
        self,
        concurrency: int = 2,
        *,
        settings: Settings | None = None,
        wrap: Sequence[str] = (),
    ) -> Child:
        """A worker node of ``concurrency`` slots with ``settings`` (the stack's by default),
        its command behind ``wrap`` (e.g. a lab's ``ip netns exec``); returns once it beats."""
        settings = settings or self.settings
        heartbeat = Path(settings.heartbeat_file)
        await asyncio.to_thread(heartbeat.unlink, missing_ok=True)
        name = f"worker-{settings.worker_pool}-c{concurrency}"
        args = [sys.executable, "-m", "worker_service", f"--concurrency={concurrency}"]
        args = [*wrap, *args, "--without-mingle"]
        child = Child(name, args, settings_env(settings), self.dir / f"{name}.log")
        self.children.append(child)
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(heartbeat.exists):
            if not child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"worker did not start:\n{child.output()}")
            await asyncio.sleep(0.05)
        return child

    async def start_critical_worker(self) -> Child:
        """``python -m worker_service --critical``: the reserved node of the critical queue."""
        heartbeat = Path(f"{self.settings.heartbeat_file}.critical")
        await asyncio.to_thread(heartbeat.unlink, missing_ok=True)
        child = self.start(
            "worker-critical",
            ["-m", "worker_service", "--critical", "--without-mingle"],
            settings_env(self.settings),
        )
        deadline = time.monotonic() + 60
        while not await asyncio.to_thread(heartbeat.exists):
            if not child.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"critical worker did not start:\n{child.output()}")
            await asyncio.sleep(0.05)
        return child

    def listen(self, count: int) -> AcceptingListener:
        listener = AcceptingListener(count)
        self.listeners.append(listener)
        return listener

    def teardown(self) -> list[str]:
        """Stop every child, close listeners, delete queues, Redis keys, database and files.

        Returns what could not be removed (empty when all went)."""
        problems: list[str] = []
        for child in list(reversed(self.children)):
            child.stop(timeout=25)
        self.children.clear()
        for listener in self.listeners:
            listener.close()
        self.listeners.clear()
        try:
            asyncio.run(self._remove_services())
        except Exception as exc:  # report it and keep removing the rest
            problems.append(f"services: {exc!r}")
        shutil.rmtree(self.dir, ignore_errors=True)
        return problems

    async def _remove_services(self) -> None:
        connection = await aio_pika.connect(self.settings.broker_url, timeout=10)
        async with connection:
            for queue in sorted(self.queues):
                channel = await connection.channel()
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.queue_delete(queue)
                with contextlib.suppress(aio_pika.exceptions.AMQPError):
                    await channel.close()
        client = aioredis.Redis.from_url(self.settings.redis_url)
        try:
            keys = [k async for k in client.scan_iter(match=f"bench-{self.run_id}*", count=1000)]
            for start in range(0, len(keys), 1000):
                await client.delete(*keys[start : start + 1000])
        finally:
            await client.aclose()
        if self.migrated:
            await drop_database(self.settings.database_url)


async def wait_http(child: Child, url: str, status: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1.0) as client:
        while True:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited:\n{child.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == status:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} not ready in {timeout}s:\n{child.output()}")
            await asyncio.sleep(0.1)


# --- /proc: memory and CPU -----------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    found = [pid]
    index = 0
    while index < len(found):
        current = found[index]
        index += 1
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                text = (task / "children").read_text()
                found.extend(int(c) for c in text.split())
    return found


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces; fields resume after its closing parenthesis.
    name = text[text.index("(") + 1 : text.rindex(")")]
    return [text[: text.index(" ")], name, *text[text.rindex(")") + 2 :].split()]


def cpu_seconds(pid: int, *, with_children: bool = True) -> float:
    """CPU time of a process, plus its reaped children's (shard processes, pool restarts)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # fields[2] is field 3 (state): utime=14, stime=15, cutime=16, cstime=17 (1-based).
    ticks = int(fields[13]) + int(fields[14])
    if with_children:
        ticks += int(fields[15]) + int(fields[16])
    return ticks / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    return sum(cpu_seconds(p) for p in descendants(pid))


def cpu_by_name(names: tuple[str, ...]) -> dict[str, float]:
    """CPU seconds so far of every live process whose command name starts with one of names,
    with their reaped children's (a postmaster's counts its exited backends)."""
    totals = dict.fromkeys(names, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        for name in names:
            if fields[1].startswith(name):
                ticks = sum(int(v) for v in fields[13:17])
                totals[name] += ticks / CLOCK_TICKS
    return totals


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return total - idle, total


@dataclass
class CpuMeter:
    """CPU used by the services and the benchmark's own processes over one measurement."""

    pids: dict[str, int]
    services: tuple[str, ...] = ("beam.smp", "postgres", "redis-server")
    _start: dict[str, float] = field(default_factory=dict)
    _machine: tuple[float, float] = (0.0, 0.0)

    def _sample(self) -> dict[str, float]:
        sample = {name: tree_cpu_seconds(pid) for name, pid in self.pids.items()}
        sample.update(cpu_by_name(self.services))
        sample["bench"] = cpu_seconds(os.getpid(), with_children=False)
        return sample

    def start(self) -> None:
        self._start = self._sample()
        self._machine = machine_busy()

    def stop(self) -> dict[str, Any]:
        end = self._sample()
        busy, total = machine_busy()
        used = {k: max(0.0, end.get(k, 0.0) - v) for k, v in self._start.items()}
        share = (busy - self._machine[0]) / max(1.0, total - self._machine[1])
        return {"cpu": used, "machine_busy": share}


@contextlib.contextmanager
def sampled_memory(pid: int, interval: float = 0.25) -> Iterator[list[tuple[int, int]]]:
    """Samples (RSS, PSS) in kB of ``pid``'s tree in a thread while the block runs."""
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            tree = descendants(pid)
            samples.append((sum(rss_kb(p) for p in tree), sum(pss_kb(p) for p in tree)))
            stop.wait(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join(2)
