"""A gateway and worker of their own, and scans submitted and counted as a careful client
would: what the fault tests (tests/faults) break things under."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import asyncpg
import httpx
import pytest

from shared.settings import Settings
from tests.conftest import (
    Process,
    auth,
    base_url,
    delete_queues,
    start_api,
    start_worker,
    variant,
)

FINAL_ROW_STATES = ("completed", "failed", "revoked")


class Stack:
    """A gateway and a worker of their own, so faults do not depend on other tests' state."""

    def __init__(self, settings: Settings, run_dir: Path, concurrency: int = 2) -> None:
        self.settings = settings
        self.run_dir = run_dir
        self.concurrency = concurrency
        self.api = start_api(settings, run_dir / f"api-{settings.queue_prefix}.log")
        self.worker: Process | None = None
        self.workers = 0
        self.start_worker()

    @property
    def url(self) -> str:
        return base_url(self.settings)

    def start_worker(self) -> Process:
        self.workers += 1
        log = self.run_dir / f"worker-{self.settings.queue_prefix}-{self.workers}.log"
        self.worker = start_worker(self.settings, log, concurrency=self.concurrency)
        return self.worker

    def children(self) -> list[int]:
        assert self.worker is not None
        out = subprocess.run(
            ["pgrep", "-P", str(self.worker.popen.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(pid) for pid in out.split()]

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.discard()
        self.api.stop()


@contextlib.contextmanager
def fault_stack(
    settings: Settings, run_dir: Path, name: str, *, concurrency: int = 2, **changes: Any
) -> Iterator[Stack]:
    """A gateway and a worker on settings of their own, without per-key limits."""
    own = variant(
        settings,
        name,
        run_dir,
        rate_limit_per_minute=100_000,
        max_active_scans=100_000,
        **changes,
    )
    created = Stack(own, run_dir, concurrency)
    try:
        yield created
    finally:
        created.stop()
        asyncio.run(delete_queues(own))


def query(settings: Settings, sql: str, *args: Any) -> list[asyncpg.Record]:
    async def run() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(settings.database_url, timeout=5)
        try:
            return list(await conn.fetch(sql, *args))
        finally:
            await conn.close()

    return asyncio.run(run())


class Batch:
    """Scans submitted as a careful client would: one Idempotency-Key per scan, retried
    after a 503 until accepted or the deadline."""

    def __init__(
        self,
        fault: str,
        stack: Stack,
        key: str,
        ports: str,
        timeout: float,
        **config: object,
    ) -> None:
        self.fault = fault
        self.name = f"{fault}-{uuid4().hex[:8]}"
        self.stack = stack
        self.client = httpx.Client(base_url=stack.url, headers=auth(key), timeout=10)
        self.body = {
            "target": "127.0.0.1",
            "ports": ports,
            "config": {"timeout": timeout, "service_detection": False, **config},
        }
        self.submitted = 0
        self.refused = 0
        self.accepted: dict[str, str] = {}
        self.key = key

    def once(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request on a fresh connection: a kept-alive one may have been closed by the
        server while the test waited, and a POST is not retried on that race."""
        return httpx.request(
            method, self.stack.url + path, headers=auth(self.key), timeout=10, **kwargs
        )

    def submit(self, count: int, deadline: float = 60) -> None:
        for _ in range(count):
            key = f"{self.name}-{self.submitted}"
            self.submitted += 1
            give_up = time.monotonic() + deadline
            while time.monotonic() < give_up:
                try:
                    response = self.client.post(
                        "/api/scan", json=self.body, headers={"Idempotency-Key": key}
                    )
                except httpx.TransportError:
                    time.sleep(0.5)
                    continue
                if response.status_code == 202:
                    self.accepted[key] = response.json()["task_id"]
                    break
                assert response.status_code == 503, response.text
                self.refused += 1
                time.sleep(min(2.0, float(response.headers.get("retry-after", "1"))))

    def wait_running(self, at_least: int = 1, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows()
            if sum(r["state"] == "running" for r in rows) >= at_least:
                return
            time.sleep(0.05)
        pytest.fail(f"{self.name}: no scan started running")

    def rows(self) -> list[asyncpg.Record]:
        return query(
            self.stack.settings,
            "SELECT idempotency_key, task_id, state, error, attempts FROM scans"
            " WHERE idempotency_key LIKE $1",
            f"{self.name}-%",
        )

    def settle(self, report: list[dict[str, Any]], timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        rows: list[asyncpg.Record] = []
        while time.monotonic() < deadline:
            rows = self.rows()
            if len(rows) >= len(self.accepted) and all(
                r["state"] in FINAL_ROW_STATES for r in rows
            ):
                break
            time.sleep(0.25)
        self.client.close()
        by_key: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            by_key.setdefault(row["idempotency_key"], []).append(row)
        final = {k: v[0] for k, v in by_key.items() if v[0]["state"] in FINAL_ROW_STATES}
        counts = {
            "fault": self.fault,
            "submitted": self.submitted,
            "accepted": len(self.accepted),
            "refused_503": self.refused,
            "completed": sum(r["state"] == "completed" for r in final.values()),
            "failed": sum(r["state"] == "failed" and bool(r["error"]) for r in final.values()),
            "lost": sum(1 for key in self.accepted if key not in final),
            "duplicated": sum(len(v) - 1 for v in by_key.values())
            + sum(
                1 for k, t in self.accepted.items() if k in final and str(final[k]["task_id"]) != t
            ),
            "reasons": sorted({r["error"] for r in final.values() if r["state"] == "failed"}),
        }
        report.append(counts)
        return counts


def assert_nothing_lost(counts: dict[str, Any]) -> None:
    assert counts["accepted"] == counts["submitted"], counts
    assert counts["lost"] == 0, counts
    assert counts["duplicated"] == 0, counts
    assert counts["completed"] + counts["failed"] == counts["accepted"], counts


def scan_ports(listeners: list[int], silent_port: int) -> str:
    return ",".join(map(str, [*listeners, silent_port]))
