"""Assemble a worker's Celery app: tasks, heartbeat, and per-process runtime teardown."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_shutdown

from shared.settings import Settings
from worker_service.celery_app import make_celery
from worker_service.heartbeat import install_heartbeat
from worker_service.runtime import close_runtime
from worker_service.tasks import register_tasks


def _close_runtime(**_: Any) -> None:
    close_runtime()


def create_worker_app(settings: Settings) -> Celery:
    app = make_celery(settings)
    register_tasks(app)
    install_heartbeat(app)
    worker_process_shutdown.connect(_close_runtime, weak=False)
    return app
