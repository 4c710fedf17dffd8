"""Threads-pool test helpers: a runtime that leaves this process's limits alone, task threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from shared.settings import Settings
from worker_service import runtime as runtime_module
from worker_service.runtime import WorkerRuntime


@contextmanager
def threads_runtime(
    monkeypatch: pytest.MonkeyPatch, concurrency: int = 3, **options: Any
) -> Iterator[WorkerRuntime]:
    """A threads-mode runtime, closed after; the pytest process's open-file limit is not
    raised as a worker's would be."""
    monkeypatch.setattr(runtime_module, "raise_open_files_limit", lambda: 0)
    created = WorkerRuntime(
        Settings(worker_pool="threads", worker_concurrency=concurrency), **options
    )
    try:
        yield created
    finally:
        created.close()


def in_threads(*calls: Callable[[], object]) -> list[object]:
    """Run each call on a thread of its own, as Celery's threads pool runs tasks; what each
    returned or raised (``Abandoned`` included), in order."""
    results: list[object] = [None] * len(calls)

    def one(index: int, call: Callable[[], object]) -> None:
        try:
            results[index] = call()
        except BaseException as exc:  # handed to the test
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i, c)) for i, c in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads), "a task thread never returned"
    return results


def eventually(predicate: Callable[[], object], what: str, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)
