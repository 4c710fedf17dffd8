"""A scan's last Redis writes go with its final state, in one transaction, on the real Redis."""

from __future__ import annotations

import logging
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import orjson
import pytest
import redis
from celery import states
from redis.client import Pipeline

from bench._stack import free_port
from shared.protocol import STORING
from shared.redis_keys import active_key, events_key, result_key
from shared.settings import Settings
from worker_service.backend import ScanResultBackend
from worker_service.celery_app import make_celery
from worker_service.reporting import EventLog


@pytest.fixture
def client(settings: Settings) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(settings.redis_url)
    yield connection
    connection.close()


_MADE: list[ScanResultBackend] = []


@pytest.fixture(autouse=True)
def _close_backends() -> Iterator[None]:
    """Each backend a test made gives its Redis connections back when the test ends."""
    yield
    while _MADE:
        _MADE.pop().client.connection_pool.disconnect()


def backend_for(settings: Settings) -> ScanResultBackend:
    backend = make_celery(settings).backend
    assert isinstance(backend, ScanResultBackend)
    _MADE.append(backend)
    return backend


class Scan:
    """A finishing scan's ids, its slot in its key's active set, and its end-of-scan rider."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.task_id = str(uuid4())
        self.owner = uuid4()
        self.prefix = settings.redis_prefix
        self.client = client
        self.events = EventLog(client, self.prefix, self.task_id, 60)
        client.zadd(active_key(self.prefix, self.owner), {self.task_id: time.time() + 60})

    def rider(self, pipe: Pipeline, state: str) -> None:
        self.events.add_to(pipe, ("end", {"state": state}), release=self.owner)

    def holds_slot(self) -> bool:
        return self.client.zscore(active_key(self.prefix, self.owner), self.task_id) is not None

    def ends(self) -> list[Any]:
        entries: list[Any] = self.client.xrange(events_key(self.prefix, self.task_id)) or []
        return [orjson.loads(fields[b"data"]) for _id, fields in entries]

    def stored_state(self) -> str | None:
        meta = self.client.get(result_key(self.prefix, self.task_id))
        return None if meta is None else str(orjson.loads(meta)["status"])


class Monitor:
    """Every command Redis executes while open (MONITOR), until a marker is echoed."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.seen: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        with self.client.monitor() as monitor:  # type: ignore[no-untyped-call]
            for info in monitor.listen():
                self.seen.append(info)
                if info["command"] == "ECHO monitor-done":
                    return

    def __enter__(self) -> Monitor:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not any(i["command"] == "ECHO monitor-ready" for i in self.seen):
            assert time.monotonic() < deadline, "MONITOR never started"
            self.client.echo("monitor-ready")
            time.sleep(0.01)
        return self

    def __exit__(self, *_: object) -> None:
        self.client.echo("monitor-done")
        self._thread.join(10)

    def commands_of(self, port: str) -> list[str]:
        return [i["command"] for i in self.seen if i["client_port"] == port]


def test_the_final_state_carries_the_end_event_and_slot_release_in_one_transaction(
    settings: Settings, client: redis.Redis
) -> None:
    backend = backend_for(settings)
    scan = Scan(settings, client)
    meta_key = result_key(settings.redis_prefix, scan.task_id)
    with Monitor(client) as monitor:
        assert backend.finish(scan.task_id, states.SUCCESS, {"open_ports": []}, scan.rider)
    stored = [i for i in monitor.seen if i["command"].startswith(f"SET {meta_key} ")]
    assert len(stored) == 1
    assert stored[0]["command"].endswith(f" EX {settings.result_ttl}")
    names = [c.split(" ", 1)[0] for c in monitor.commands_of(stored[0]["client_port"])]
    assert names[names.index("MULTI") :] == [
        "MULTI",
        "SET",
        "PUBLISH",
        "XADD",
        "EXPIRE",
        "ZREM",
        "EXEC",
    ]
    assert not any(i["command"] == f"GET {meta_key}" for i in monitor.seen)
    assert scan.stored_state() == "SUCCESS"
    assert scan.ends() == [{"state": "SUCCESS"}]
    assert not scan.holds_slot()


def test_a_failure_is_stored_with_its_reason_for_clients(
    settings: Settings, client: redis.Redis
) -> None:
    backend = backend_for(settings)
    scan = Scan(settings, client)
    assert backend.finish(scan.task_id, states.FAILURE, "time limit exceeded (5 s)", scan.rider)
    meta = orjson.loads(client.get(result_key(settings.redis_prefix, scan.task_id)) or b"{}")
    assert meta["status"] == "FAILURE"
    assert meta["result"]["exc_module"] == "shared.errors"
    assert meta["result"]["exc_message"] == ["time limit exceeded (5 s)"]
    assert scan.ends() == [{"state": "FAILURE"}]
    assert not scan.holds_slot()


def test_finish_without_redis_logs_and_goes_on(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    away = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    backend = backend_for(away)
    task_id = str(uuid4())
    sent: list[str] = []

    def rider(pipe: Pipeline, state: str) -> None:
        sent.append(state)
        pipe.xadd(events_key(settings.redis_prefix, task_id), {"kind": "end"})

    with caplog.at_level(logging.WARNING, logger="worker_service.backend"):
        assert not backend.finish(task_id, states.SUCCESS, {"open_ports": []}, rider)
    # Two attempts at once (one for a connection a Redis restart closed), then it gives up: a
    # Redis that is away fails the store fast.
    assert sent == ["SUCCESS", "SUCCESS"]
    assert f"task {task_id}: final state and end event not written" in caplog.text


def test_a_queued_storing_never_replaces_a_settled_state(
    settings: Settings, client: redis.Redis
) -> None:
    """A threads-pool task whose drain gave up may have a STORING still queued on the writer
    thread when a final state is stored: it lands over progress, never over that."""
    backend = backend_for(settings)
    scan = Scan(settings, client)
    progress = {"progress": 40}
    assert backend.finish(scan.task_id, "PROGRESS", progress, lambda _pipe, _state: None)
    assert backend.finish(scan.task_id, STORING, {"open_ports": []}, lambda _pipe, _state: None)
    assert scan.stored_state() == STORING
    for settled in (states.SUCCESS, states.RETRY):
        assert backend.finish(scan.task_id, settled, {}, lambda _pipe, _state: None)
        assert backend.finish(scan.task_id, STORING, {}, lambda _pipe, _state: None)
        assert scan.stored_state() == settled


def test_late_progress_never_replaces_a_settled_state(
    settings: Settings, client: redis.Redis
) -> None:
    """A shard's progress still queued when its scan's merge stored SUCCESS, or a cancelled
    engine's last event after REVOKED: clients keep reading the final state."""
    backend = backend_for(settings)
    scan = Scan(settings, client)
    backend.store_result(scan.task_id, {"progress": 10}, "PROGRESS")
    assert scan.stored_state() == "PROGRESS"
    for settled in (STORING, states.SUCCESS, states.REVOKED):
        assert backend.finish(scan.task_id, settled, {}, lambda _pipe, _state: None)
        backend.store_result(scan.task_id, {"progress": 99}, "PROGRESS")
        assert scan.stored_state() == settled


def test_a_retried_tasks_next_delivery_reports_progress_again(
    settings: Settings, client: redis.Redis
) -> None:
    """Celery stores RETRY under the task's id; its next delivery's progress replaces it."""
    backend = backend_for(settings)
    scan = Scan(settings, client)
    assert backend.finish(scan.task_id, states.RETRY, {}, lambda _pipe, _state: None)
    backend.store_result(scan.task_id, {"progress": 5}, "PROGRESS")
    assert scan.stored_state() == "PROGRESS"


def test_a_result_the_task_will_return_is_not_stored_twice(
    settings: Settings, client: redis.Redis
) -> None:
    """Marked before its write is even queued, so Celery's own store skips it whenever the
    task returns; once: the mark does not outlive that store."""
    backend = backend_for(settings)
    scan = Scan(settings, client)
    backend.will_return(scan.task_id)
    backend.mark_as_done(scan.task_id, {"open_ports": []})
    assert scan.stored_state() is None
    with warnings.catch_warnings():
        # Celery's own store calls redis-py's SETEX, which redis-py now calls deprecated.
        warnings.simplefilter("ignore", DeprecationWarning)
        backend.mark_as_done(scan.task_id, {"open_ports": []})
    assert scan.stored_state() == states.SUCCESS
