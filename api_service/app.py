"""``create_app(settings)``: the Starlette application and the resources its lifespan owns."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.applications import Starlette

from api_service.errors import EXCEPTION_HANDLERS
from api_service.publisher import AmqpPublisher, TaskPublisher
from api_service.routes import routes
from api_service.status import StatusReader
from shared.settings import Settings
from shared.store import ScanStore, create_pool


@dataclass(slots=True)
class Services:
    """What handlers reach through ``request.app.state.services``."""

    settings: Settings
    store: ScanStore
    redis: aioredis.Redis
    publisher: TaskPublisher
    status: StatusReader


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await create_pool(settings.database_url, max_size=settings.db_pool_size)
        redis = aioredis.Redis.from_url(
            settings.redis_url, socket_timeout=2.0, socket_connect_timeout=1.0
        )
        publisher = AmqpPublisher(settings)
        await publisher.start()
        store = ScanStore(pool)
        app.state.services = Services(
            settings=settings,
            store=store,
            redis=redis,
            publisher=publisher,
            status=StatusReader(store, redis, settings.redis_prefix),
        )
        try:
            yield
        finally:
            await publisher.close()
            await redis.aclose()
            await pool.close()

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
