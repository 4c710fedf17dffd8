"""The Celery application, built from settings: queues, routing, QoS, codec, result backend."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from shared import codec
from shared.protocol import SCAN_TASK, queue_arguments
from shared.settings import Settings


def scan_queue(name: str, dead_letter_queue: str) -> Queue:
    """The scan queue as every Celery-side declarer must declare it (priorities, dead letters)."""
    return Queue(
        name, routing_key=name, queue_arguments=queue_arguments(dead_letter_queue), durable=True
    )


def make_celery(settings: Settings) -> Celery:
    """A Celery app bound to these settings; importing this module starts nothing."""
    codec.register_with_kombu()
    app = Celery("cybersec", set_as_current=False)
    app.conf.update(
        broker_url=settings.broker_url,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        # Celery's Redis backend; a scan's last event writes ride on its final state.
        result_backend=f"worker_service.backend:ScanResultBackend+{settings.redis_url}",
        result_backend_transport_options={
            "global_keyprefix": settings.redis_prefix,
            # Fail fast while Redis is away: PostgreSQL holds every result, and a worker stuck
            # retrying the backend would stop scanning.
            "retry_policy": {
                "max_retries": 2,
                "interval_start": 0,
                "interval_step": 0.5,
                "interval_max": 1,
            },
        },
        # Celery's defaults wait 120 s on a Redis that accepts and then hangs.
        redis_socket_timeout=5.0,
        redis_socket_connect_timeout=5.0,
        result_expires=settings.result_ttl,
        result_extended=False,
        task_serializer=codec.CODEC_NAME,
        result_serializer=codec.CODEC_NAME,
        accept_content=[codec.CODEC_NAME],
        result_accept_content=[codec.CODEC_NAME],
        # A node consumes both unless started with ``--queues`` (the critical node's
        # ``python -m worker_service --critical``): critical scans take any free process.
        task_queues=[
            scan_queue(settings.scan_queue, settings.dead_letter_queue),
            scan_queue(settings.critical_queue, settings.dead_letter_queue),
        ],
        task_default_queue=settings.scan_queue,
        task_routes={SCAN_TASK: {"queue": settings.scan_queue}},
        task_queue_max_priority=None,
        task_acks_late=True,
        worker_consumer="worker_service.guard:GuardedConsumer",
        # Retries publish a new message before acking the old one: confirm it first.
        broker_transport_options={"confirm_publish": True},
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=settings.worker_concurrency,
        worker_pool=settings.worker_pool,  # threads: worker_service.pool.ThreadsPool
        worker_hijack_root_logger=False,
        worker_soft_shutdown_timeout=float(settings.shutdown_timeout),
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_heartbeat=30,
        task_track_started=False,
        enable_utc=True,
    )
    app.conf.cybersec_settings = settings
    return app
