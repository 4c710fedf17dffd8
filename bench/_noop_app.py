"""The reference worker: a stock Celery app whose one task does nothing.

``python -m bench._noop_app [celery worker options]`` reads ``BENCH_BROKER_URL``,
``BENCH_REDIS_URL``, ``BENCH_REDIS_PREFIX``, ``BENCH_QUEUE`` and ``BENCH_DEAD_QUEUE``. Same pool
settings as ours (prefork, prefetch multiplier 1, late acks), json serializer, Redis results.
"""

from __future__ import annotations

import os
import sys

from celery import Celery

from worker_service.celery_app import scan_queue

NOOP_TASK = "bench.noop"


def make_noop_app(
    broker_url: str,
    queue: str,
    dead_queue: str,
    *,
    redis_url: str | None = None,
    redis_prefix: str = "",
) -> Celery:
    """The worker app with ``redis_url``; without, a publish-only client of the same queue."""
    app = Celery("bench_noop", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_queues=[scan_queue(queue, dead_queue)],
        task_default_queue=queue,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
    )
    if redis_url is not None:
        app.conf.update(
            result_backend=redis_url,
            result_backend_transport_options={"global_keyprefix": redis_prefix},
        )

    @app.task(name=NOOP_TASK)
    def noop() -> None:
        return None

    return app


def main() -> None:
    env = os.environ
    app = make_noop_app(
        env["BENCH_BROKER_URL"],
        env["BENCH_QUEUE"],
        env["BENCH_DEAD_QUEUE"],
        redis_url=env["BENCH_REDIS_URL"],
        redis_prefix=env["BENCH_REDIS_PREFIX"],
    )
    app.worker_main(["worker", "--loglevel=WARNING", *sys.argv[1:]])


if __name__ == "__main__":
    main()
