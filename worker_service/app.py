"""Assemble a worker's Celery app: tasks, heartbeat, reaper, metrics, log context, teardown."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_init, worker_process_shutdown

from shared.logging import bind_scan, unbind_scan
from shared.settings import Settings
from worker_service.celery_app import make_celery
from worker_service.heartbeat import install_heartbeat
from worker_service.metrics import install_metrics
from worker_service.pool import settle_pool
from worker_service.reaper import install_reaper
from worker_service.runtime import close_runtime
from worker_service.tasks import register_tasks


def _close_runtime(**_: Any) -> None:
    close_runtime()


def _bind_log_context(task_id: str, args: Any = (), **_: Any) -> None:
    """Log lines of a task carry its task id and the scan id of its payload."""
    payload = args[0] if isinstance(args, list | tuple) and args else None
    scan_id = payload.get("scan_id") if isinstance(payload, dict) else None
    unbind_scan()
    bind_scan(scan_id=scan_id, task_id=task_id)


def _unbind_log_context(**_: Any) -> None:
    unbind_scan()


def create_worker_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    register_tasks(app)
    install_heartbeat(app)
    install_reaper(settings)
    worker_init.connect(settle_pool, weak=False)
    # prefork: each child closes its own runtime; threads: ThreadsPool does, once stopped.
    worker_process_shutdown.connect(_close_runtime, weak=False)
    # Receivers run in connection order: metrics' own log lines still carry the ids.
    task_prerun.connect(_bind_log_context, weak=False)
    install_metrics(app, settings)
    task_postrun.connect(_unbind_log_context, weak=False)
    return app
