"""The floor of any gateway built like ours: a Starlette endpoint that only parses and publishes.

``python -m bench._thin_gateway`` reads our ``CYBERSEC_*`` settings and serves ``POST /api/scan``
on ``CYBERSEC_API_PORT``: the JSON body is parsed with orjson, turned into our protocol-v2
message and published with our publisher (broker confirm awaited), and a 202 is answered. No
key, limit, policy, database row, metrics or log line: what remains is what uvicorn, Starlette
and aio-pika cost per request, which bounds how far any of those features could be trimmed.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from uuid import uuid4

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.publisher import AmqpPublisher
from shared.protocol import LimitPolicy, build_scan_message
from shared.schemas import ScanConfig, ScanTaskPayload
from shared.settings import Settings, load_settings


def create_app(settings: Settings) -> Starlette:
    publisher = AmqpPublisher(settings)
    limits = LimitPolicy.of(settings)

    async def submit(request: Request) -> Response:
        data = orjson.loads(await request.body())
        task_id = uuid4()
        payload = ScanTaskPayload(
            scan_id=uuid4(),
            target=data["target"],
            ports=data["ports"],
            priority=data.get("priority", "normal"),
            config=ScanConfig(),
        )
        await publisher.publish(build_scan_message(task_id, payload, port_count=1, limits=limits))
        body = orjson.dumps({"task_id": str(task_id), "status": "queued"})
        return Response(body, status_code=202, media_type="application/json")

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await publisher.start()
        yield
        await publisher.close()

    return Starlette(routes=[Route("/api/scan", submit, methods=["POST"])], lifespan=lifespan)


def main() -> None:
    settings = load_settings()
    uvicorn.run(
        create_app(settings),
        host="127.0.0.1",
        port=settings.api_port,
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
