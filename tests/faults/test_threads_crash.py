"""A threads-pool worker stopped with several scans in flight in its one process, killed or
by SIGTERM: the broker gets every one back (late acks), a new worker runs them, and each ends
exactly once.

These tests stop no shared service (only their own worker), so they may run beside anything.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from tests.support.faults import (
    Batch,
    Stack,
    assert_nothing_lost,
    fault_stack,
    query,
    scan_ports,
)
from tests.support.lifecycle import worker_processes

pytestmark = [pytest.mark.faults, pytest.mark.timeout(90)]


@pytest.fixture(scope="module")
def threads_stack(settings: Settings, run_dir: Path, database: str) -> Iterator[Stack]:
    with fault_stack(
        settings, run_dir, "threads-crash", concurrency=3, worker_pool="threads", shutdown_timeout=3
    ) as created:
        yield created


def test_a_killed_threads_worker_loses_and_repeats_no_scan(
    threads_stack: Stack,
    api_key: str,
    listeners: list[int],
    silent_port: int,
    report: list[dict[str, Any]],
) -> None:
    stack = threads_stack
    # Each scan waits 3 s on its silent port (no retransmission): all three are in flight.
    ports = scan_ports(listeners, silent_port)
    batch = Batch("threads worker SIGKILL", stack, api_key, ports, 3.0, retries=0)
    batch.submit(3)
    batch.wait_running(at_least=3)
    assert stack.worker is not None
    assert worker_processes(stack.settings.queue_prefix) == [stack.worker.popen.pid]
    os.kill(stack.worker.popen.pid, signal.SIGKILL)
    stack.worker.stop()
    stack.start_worker()
    counts = batch.settle(report, timeout=60)
    assert_nothing_lost(counts)
    assert counts["completed"] == 3, counts
    # Every scan the process held was redelivered, and the poison guard counted it lost once.
    assert lost_deliveries(batch) == [1, 1, 1]


def test_sigterm_hands_every_running_scan_back_within_the_bound(
    threads_stack: Stack,
    api_key: str,
    listeners: list[int],
    silent_port: int,
    report: list[dict[str, Any]],
) -> None:
    stack = threads_stack
    # Each scan waits 4.5 s on its silent port, longer than the 3 s shutdown bound.
    ports = scan_ports(listeners, silent_port)
    batch = Batch("threads worker SIGTERM", stack, api_key, ports, 4.5, retries=0)
    batch.submit(3)
    batch.wait_running(at_least=3)
    assert stack.worker is not None
    stack.worker.popen.send_signal(signal.SIGTERM)
    # Raises if the worker outlives its bound (plus start-up slack) instead of requeueing.
    stack.worker.popen.wait(stack.settings.shutdown_timeout + 15)
    log = stack.worker.output()
    assert "Soft Shutdown" in log, log[-2000:]
    stack.worker.stop()
    stack.start_worker()
    counts = batch.settle(report, timeout=60)
    assert_nothing_lost(counts)
    assert counts["completed"] == 3, counts
    # Handed back in order: released, not lost, so the poison guard does not count them.
    assert lost_deliveries(batch) == [0, 0, 0]
    assert [row["attempts"] for row in batch.rows()] == [2, 2, 2]


def lost_deliveries(batch: Batch) -> list[int]:
    rows = query(
        batch.stack.settings,
        "SELECT attempts - 1 - released AS lost FROM scans WHERE idempotency_key LIKE $1",
        f"{batch.name}-%",
    )
    return sorted(row["lost"] for row in rows)
