"""The reference gateway: a minimal Starlette endpoint calling Celery's blocking ``send_task``.

``python -m bench._celery_gateway`` reads ``BENCH_BROKER_URL``, ``BENCH_QUEUE``,
``BENCH_DEAD_QUEUE``, ``BENCH_PORT`` and ``BENCH_LOG_LEVEL``. Each POST publishes one task with
``confirm_publish`` (the blocking py-amqp publish waits for the broker's confirm) from
Starlette's thread pool, as a stock Celery client inside an async framework would. It has no
result backend, so ``send_task`` does not subscribe to result channels: the reference is as fast
as stock Celery publishing gets.
"""

from __future__ import annotations

import os
from uuid import uuid4

import uvicorn
from celery import Celery
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.protocol import PRIORITIES, SCAN_TASK
from worker_service.celery_app import scan_queue


def make_celery(broker_url: str, queue: str, dead_queue: str) -> Celery:
    app = Celery("bench_gateway", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        broker_transport_options={"confirm_publish": True},
        task_serializer="json",
        accept_content=["json"],
        task_queues=[scan_queue(queue, dead_queue)],
        task_default_queue=queue,
    )
    return app


def create_app(celery: Celery, queue: str) -> Starlette:
    async def submit(request: Request) -> Response:
        data = await request.json()
        task_id = str(uuid4())
        await run_in_threadpool(
            celery.send_task,
            SCAN_TASK,
            args=[data],
            task_id=task_id,
            queue=queue,
            priority=PRIORITIES.get(data.get("priority", "normal"), 4),
        )
        return JSONResponse({"task_id": task_id, "status": "queued"}, status_code=202)

    return Starlette(routes=[Route("/api/scan", submit, methods=["POST"])])


def main() -> None:
    queue = os.environ["BENCH_QUEUE"]
    celery = make_celery(os.environ["BENCH_BROKER_URL"], queue, os.environ["BENCH_DEAD_QUEUE"])
    uvicorn.run(
        create_app(celery, queue),
        host="127.0.0.1",
        port=int(os.environ["BENCH_PORT"]),
        log_level=os.environ.get("BENCH_LOG_LEVEL", "info").lower(),
    )


if __name__ == "__main__":
    main()
