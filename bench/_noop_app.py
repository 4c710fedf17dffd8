"""The reference worker: a stock Celery app whose one task does nothing.

``python -m bench._noop_app [celery worker options]`` reads ``BENCH_BROKER_URL``,
``BENCH_REDIS_URL``, ``BENCH_REDIS_PREFIX``, ``BENCH_QUEUE``, ``BENCH_DEAD_QUEUE`` and
``BENCH_LOG_LEVEL`` (default WARNING). Same pool settings as ours (prefork, prefetch multiplier 1,
late acks), json serializer, Redis results; the benchmark gives it our worker's log level, since
Celery's two log lines per task cost a 1 ms task about a tenth of its rate.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import asyncpg
from celery import Celery

from worker_service.celery_app import scan_queue

NOOP_TASK = "bench.noop"
WRITE_TASK = "bench.write"
"""A task that only commits one row to PostgreSQL (``BENCH_DATABASE_URL``): the least any scan
task that keeps a durable record must do, so the ceiling of such a worker on this machine."""
INSERT_ROW = "INSERT INTO bench_writes (id, body) VALUES ($1, $2)"
CREATE_TABLE = "CREATE TABLE IF NOT EXISTS bench_writes (id uuid PRIMARY KEY, body jsonb NOT NULL)"


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

    @app.task(name=WRITE_TASK)
    def write(row: str) -> None:
        _Writer.get().write(row)

    return app


class _Writer:
    """One event loop and one PostgreSQL connection per pool process, as our worker keeps."""

    _instance: _Writer | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        url = os.environ["BENCH_DATABASE_URL"]
        self.conn: Any = self.loop.run_until_complete(asyncpg.connect(url))

    @classmethod
    def get(cls) -> _Writer:
        if cls._instance is None or cls._instance.pid != os.getpid():
            cls._instance = cls()
        return cls._instance

    def write(self, row: str) -> None:
        self.loop.run_until_complete(self.conn.execute(INSERT_ROW, row, '{"state": "done"}'))


async def create_write_table(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(CREATE_TABLE)
    finally:
        await conn.close()


def main() -> None:
    env = os.environ
    app = make_noop_app(
        env["BENCH_BROKER_URL"],
        env["BENCH_QUEUE"],
        env["BENCH_DEAD_QUEUE"],
        redis_url=env["BENCH_REDIS_URL"],
        redis_prefix=env["BENCH_REDIS_PREFIX"],
    )
    level = env.get("BENCH_LOG_LEVEL", "WARNING")
    app.worker_main(["worker", f"--loglevel={level}", *sys.argv[1:]])


if __name__ == "__main__":
    main()
