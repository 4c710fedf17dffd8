"""``create_app(settings)``: the Starlette application and the resources its lifespan owns."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware

from api_service.auth import Authenticator
from api_service.dispatcher import ScheduleCheck
from api_service.errors import EXCEPTION_HANDLERS
from api_service.events import EventStreams, EventWriter
from api_service.limits import Limiter
from api_service.metrics import ApiMetrics, MeteredPublisher, MetricsMiddleware
from api_service.publisher import AmqpPublisher, TaskPublisher
from api_service.routes import routes
from api_service.status import StatusReader
from api_service.ui import ui_routes
from api_service.ui.session import SessionCookies, stored_secret
from shared.keys import KeyStore
from shared.policy import TargetPolicy
from shared.retry import async_redis_retry
from shared.schedule_store import ScheduleStore
from shared.settings import Settings
from shared.store import ScanStore, create_pool
from shared.webhook_store import WebhookStore
from shared.webhooks import WebhookAddresses

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Services:
    """What handlers reach through ``request.app.state.services``."""

    settings: Settings
    store: ScanStore
    keys: KeyStore
    auth: Authenticator
    redis: aioredis.Redis
    publisher: TaskPublisher
    status: StatusReader
    limiter: Limiter
    policy: TargetPolicy
    events: EventWriter
    streams: EventStreams
    lookups: asyncio.Semaphore
    schedules: ScheduleStore
    webhooks: WebhookStore
    webhook_addresses: WebhookAddresses
    schedule_check: ScheduleCheck


async def register_env_keys(keys: KeyStore, settings: Settings) -> None:
    """Keys from CYBERSEC_API_KEYS are stored as hashes like any other, named by position."""
    for index, key in enumerate(settings.api_keys, start=1):
        await keys.create(f"env-{index}", key=key, source="env")
    if settings.api_keys:
        log.info("registered %d API key(s) from CYBERSEC_API_KEYS", len(settings.api_keys))


def create_app(settings: Settings) -> Starlette:
    metrics = ApiMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        pool = await create_pool(settings.database_url, max_size=settings.db_pool_size)
        redis = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=3.0,
            socket_connect_timeout=1.0,
            retry=async_redis_retry(),
        )
        # Event streams block on XREAD: their own pool, so they never hold the limiter's.
        stream_redis = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=3.0,
            socket_connect_timeout=1.0,
            max_connections=settings.max_event_streams + 4,
            retry=async_redis_retry(),
        )
        publisher = AmqpPublisher(settings)
        await publisher.start()
        store = ScanStore(pool)
        keys = KeyStore(pool)
        await register_env_keys(keys, settings)
        streams = EventStreams(
            stream_redis,
            store,
            per_key=settings.max_event_streams_per_key,
            total=settings.max_event_streams,
        )
        watcher = asyncio.create_task(streams.watch_forever(), name="event-stream-watcher")
        app.state.ui_cookies = SessionCookies(
            await stored_secret(pool), settings.ui_session_seconds
        )
        policy = TargetPolicy(settings.target_allow, settings.target_deny)
        lookups = asyncio.Semaphore(settings.max_concurrent_lookups)
        app.state.services = Services(
            settings=settings,
            store=store,
            keys=keys,
            auth=Authenticator(keys, stale_seconds=settings.auth_stale_seconds),
            redis=redis,
            publisher=MeteredPublisher(publisher, metrics),
            status=StatusReader(store, redis, settings.redis_prefix),
            limiter=Limiter(
                redis,
                settings.redis_prefix,
                settings.rate_limit_per_minute,
                settings.max_active_scans,
                owner_ttl=settings.result_ttl,
                critical_per_minute=settings.critical_per_minute,
            ),
            policy=policy,
            events=EventWriter(redis, settings.redis_prefix, settings.result_ttl),
            streams=streams,
            lookups=lookups,
            schedules=ScheduleStore(pool),
            webhooks=WebhookStore(pool),
            webhook_addresses=WebhookAddresses.from_settings(settings),
            schedule_check=ScheduleCheck(settings, policy, lookups),
        )
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
            await publisher.close()
            await stream_redis.aclose()
            await redis.aclose()
            await store.close()
            await pool.close()

    app = Starlette(
        routes=[*routes, *ui_routes()],
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[Middleware(MetricsMiddleware, metrics=metrics)],
    )
    app.state.metrics = metrics
    return app
