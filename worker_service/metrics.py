"""A worker's Prometheus metrics: counted by Celery signals in each prefork child, served by the
main process on CYBERSEC_METRICS_PORT.

prometheus_client's multiprocess mode keeps each process's samples in files under
``PROMETHEUS_MULTIPROC_DIR``, which ``python -m worker_service`` creates per worker, before
prometheus_client is imported, and removes at exit. The main process's endpoint merges them.

Outcomes: a task's own run ends in ``task_postrun``, labelled by the typed outcome that
``lifecycle.finish`` recorded on its request. What ends a task outside its run — a hard time
limit, a lost child process, a revoke before it ran — is signalled in the main process by
``task_failure`` or ``task_revoked``; those signals are counted only for tasks not running in the
process that receives them, so nothing is counted twice. A child's own worker-lost requeue (a
graceful shutdown's, or a crash's) is not counted as a failure: the message runs again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, get_args
from uuid import UUID
from wsgiref.simple_server import WSGIServer

import asyncpg
from billiard.exceptions import WorkerLostError
from celery import Celery
from celery.signals import (
    task_failure,
    task_postrun,
    task_prerun,
    task_revoked,
    worker_ready,
    worker_shutdown,
)
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server, values
from prometheus_client.multiprocess import MultiProcessCollector

from shared.protocol import MERGE_TASK, SCAN_TASK
from shared.settings import Settings
from shared.store import ScanRow
from worker_service.lifecycle import Outcome
from worker_service.runtime import Abandoned, get_runtime

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OUTCOMES = tuple(dict.fromkeys(ending.label for ending in get_args(Outcome)))
"""success, sharded, revoked, failure, retry: the labels of ``lifecycle``'s outcomes."""
OUTCOME_ATTRIBUTE = "cybersec_outcome"
"""Where ``lifecycle.finish`` leaves a delivery's outcome, on the task's request."""
QUEUE_WAIT_LOOKUP_SECONDS = 2.0

DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
RATE_BUCKETS = (10, 50, 100, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 250_000)


class WorkerMetrics:
    """The worker's metrics. They live in the multiprocess files, not in a registry."""

    def __init__(self) -> None:
        self.started = Counter(
            "cybersec_worker_scans_started", "Scan task runs started.", registry=None
        )
        self.finished = Counter(
            "cybersec_worker_scans_finished",
            "Scan task runs ended, by outcome (success, failure, revoked, retry).",
            ["outcome"],
            registry=None,
        )
        self.duration = Histogram(
            "cybersec_worker_scan_duration_seconds",
            "Wall time of a scan task run, by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=None,
        )
        self.ports_scanned = Counter(
            "cybersec_worker_ports_scanned",
            "Ports probed by completed scans (addresses times ports).",
            registry=None,
        )
        self.ports_per_second = Histogram(
            "cybersec_worker_scan_ports_per_second",
            "Ports probed per second by each completed scan.",
            buckets=RATE_BUCKETS,
            registry=None,
        )
        self.queue_wait = Histogram(
            "cybersec_worker_queue_wait_seconds",
            "Time from a scan's acceptance by the gateway to its first start on a worker.",
            buckets=WAIT_BUCKETS,
            registry=None,
        )
        for outcome in OUTCOMES:
            self.finished.labels(outcome)


@dataclass(slots=True)
class _Running:
    scan_id: UUID | None
    start: float


class TaskHooks:
    """The signal receivers; ``running`` holds this process's tasks between prerun and postrun."""

    def __init__(self, app: Celery, metrics: WorkerMetrics, settings: Settings) -> None:
        self.app = app
        self.metrics = metrics
        self.settings = settings
        self.running: dict[str, _Running] = {}

    def _ours(self, task: Any) -> bool:
        # A sharded scan starts as SCAN_TASK (outcome "sharded") and ends in MERGE_TASK.
        name = getattr(task, "name", None)
        return name in (SCAN_TASK, MERGE_TASK) and getattr(task, "app", None) is self.app

    def prerun(self, task_id: str, task: Any, args: Any = (), **_: Any) -> None:
        if not self._ours(task):
            return
        if getattr(task, "name", None) == SCAN_TASK:
            self.metrics.started.inc()
        self.running[task_id] = _Running(_scan_id(args), time.monotonic())

    def postrun(
        self, task_id: str, task: Any, retval: Any = None, state: Any = None, **_: Any
    ) -> None:
        run = self.running.pop(task_id, None)
        if run is None or not self._ours(task):
            return
        ended = getattr(getattr(task, "request", None), OUTCOME_ATTRIBUTE, None)
        # No outcome recorded: the run raised past finish (a bug; its log has it).
        outcome = str(getattr(ended, "label", "failure"))
        self.metrics.finished.labels(outcome).inc()
        self.metrics.duration.labels(outcome).observe(time.monotonic() - run.start)
        result = getattr(ended, "result", None)
        if outcome == "success" and result is not None:
            self._observe_rate(result.total_ports_scanned, result.duration_seconds)
        if outcome != "retry" and run.scan_id is not None:
            self._observe_queue_wait(run.scan_id)

    def failure(
        self, sender: Any = None, task_id: str | None = None, exception: Any = None, **_: Any
    ) -> None:
        if isinstance(exception, WorkerLostError):
            return  # requeued (task_reject_on_worker_lost): the message runs again
        self._ended_elsewhere(sender, task_id, "failure")

    def revoked(self, sender: Any = None, request: Any = None, **_: Any) -> None:
        self._ended_elsewhere(sender, getattr(request, "id", None), "revoked")

    def _ended_elsewhere(self, task: Any, task_id: str | None, outcome: str) -> None:
        if not self._ours(task) or task_id in self.running:
            return  # a run in this process: its postrun counts it
        self.metrics.finished.labels(outcome).inc()

    def _observe_rate(self, ports: int, seconds: float) -> None:
        self.metrics.ports_scanned.inc(ports)
        if ports and seconds > 0:
            self.metrics.ports_per_second.observe(ports / seconds)

    def _observe_queue_wait(self, scan_id: UUID) -> None:
        """Queue wait of a scan's first delivery: ``started_at - created_at``, both stamped by
        PostgreSQL, so no clock skew between gateway and worker hosts enters it."""
        lookup = asyncio.wait_for(self._row(scan_id), QUEUE_WAIT_LOOKUP_SECONDS)
        try:
            row = get_runtime(self.settings).run(lookup)
        except (
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            OSError,
            TimeoutError,
            Abandoned,  # the worker is stopping
        ) as exc:
            log.debug("scan %s: queue wait not measured: %r", scan_id, exc)
            return
        if row is None or row.started_at is None or row.attempts != 1:
            return
        self.metrics.queue_wait.observe(max(0.0, (row.started_at - row.created_at).total_seconds()))

    async def _row(self, scan_id: UUID) -> ScanRow | None:
        store = await get_runtime(self.settings).store()
        return await store.get(scan_id)


def _scan_id(args: Any) -> UUID | None:
    payload = args[0] if isinstance(args, list | tuple) and args else None
    raw = payload.get("scan_id") if isinstance(payload, dict) else None
    try:
        return UUID(str(raw)) if raw is not None else None
    except ValueError:
        return None


class MetricsServer:
    """The main process's endpoint: every process's samples, merged from the multiprocess files."""

    def __init__(self, port: int, directory: str) -> None:
        self.port = port
        self.registry = CollectorRegistry()
        MultiProcessCollector(self.registry, path=directory)  # type: ignore[no-untyped-call]
        self.main_pid = os.getpid()
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, **_: Any) -> None:
        if os.getpid() != self.main_pid or self._server is not None:
            return
        self._server, self._thread = start_http_server(
            self.port, addr="0.0.0.0", registry=self.registry
        )
        log.info("metrics on 0.0.0.0:%d/metrics", self.port)

    def stop(self, **_: Any) -> None:
        if os.getpid() != self.main_pid or self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None


def install_metrics(app: Celery, settings: Settings) -> MetricsServer | None:
    """Count scans in every process of this worker and serve them on ``settings.metrics_port``
    from the main process (once the worker is ready); nothing when the port is 0."""
    if not settings.metrics_port:
        return None
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory or not os.path.isdir(directory) or values.ValueClass is values.MutexValue:
        raise RuntimeError(
            f"worker metrics need {MULTIPROC_ENV} set to a directory before prometheus_client "
            "is imported; start the worker with `python -m worker_service`"
        )
    hooks = TaskHooks(app, WorkerMetrics(), settings)
    task_prerun.connect(hooks.prerun, weak=False)
    task_postrun.connect(hooks.postrun, weak=False)
    task_failure.connect(hooks.failure, weak=False)
    task_revoked.connect(hooks.revoked, weak=False)
    server = MetricsServer(settings.metrics_port, directory)
    worker_ready.connect(server.start, weak=False)
    worker_shutdown.connect(server.stop, weak=False)
    return server
