"""``python -m api_service.dispatcher``: fires due schedules, publishes their scans, sends webhooks.

Everything it does is claimed from PostgreSQL rows with ``FOR UPDATE SKIP LOCKED``, so any
number of replicas can run at once: each due run is recorded once (``schedules``), each
recorded scan is published until the broker confirms (``scan_publish_outbox``), each webhook
message is sent by one dispatcher at a time until it is delivered or has failed. Run two for
availability; a stopped one loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from api_service.publisher import AmqpPublisher, PublishFailed, TaskPublisher
from api_service.webhook_sender import WebhookSender
from shared.logging import configure_logging
from shared.policy import TargetPolicy
from shared.protocol import LimitPolicy, TaskMessage
from shared.retry import DATABASE_ERRORS as DB_ERRORS
from shared.schedule_store import FiredRun, ScheduleStore
from shared.schedules import Refusal, Schedule, ScheduleCreate, check_schedule
from shared.settings import Settings, load_settings
from shared.store import create_pool
from shared.webhook_store import WebhookStore

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TickReport:
    fired: list[FiredRun]
    published: int
    events: int
    deliveries: int


class ScheduleCheck:
    """:func:`check_schedule` with the gateway's target policy, built once."""

    def __init__(
        self,
        settings: Settings,
        policy: TargetPolicy | None = None,
        lookups: asyncio.Semaphore | None = None,
    ) -> None:
        self.settings = settings
        self.policy = policy or TargetPolicy(settings.target_allow, settings.target_deny)
        self.lookups = lookups or asyncio.Semaphore(settings.max_concurrent_lookups)

    async def __call__(self, schedule: Schedule | ScheduleCreate) -> Refusal | None:
        return await check_schedule(schedule, self.settings, self.policy, lookups=self.lookups)


async def publish_or_leave(publisher: TaskPublisher, message: TaskMessage) -> bool:
    """Publish a recorded scan's message; False (the row stays in the outbox, for a
    dispatcher's next tick) when the broker did not confirm it."""
    try:
        await publisher.publish(message)
    except PublishFailed as exc:
        log.warning("scan message %s not confirmed: %s", message.correlation_id, exc)
        return False
    return True


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        pool: asyncpg.Pool[Any],
        publisher: TaskPublisher,
        sender: WebhookSender | None = None,
    ) -> None:
        self.settings = settings
        self.schedules = ScheduleStore(pool)
        self.webhooks = WebhookStore(pool)
        self.publisher = publisher
        self.sender = sender or WebhookSender(settings)
        self.check = ScheduleCheck(settings)

    async def tick(self, now: datetime | None = None) -> TickReport:
        """One pass over everything due at ``now`` (the wall clock by default)."""
        now = now or datetime.now(UTC)
        fired = await self.schedules.fire_due(now, self.check)
        for run in fired:
            log.info(
                "schedule %s fired for %s: scan %s%s",
                run.schedule_id,
                run.scheduled_for.isoformat(),
                run.scan_id,
                f" refused ({run.error})" if run.error else "",
            )
        published = await self.schedules.publish_pending(
            functools.partial(publish_or_leave, self.publisher),
            limits=LimitPolicy.of(self.settings),
        )
        events = await self.webhooks.collect_events()
        deliveries = await self.sender.deliver_due(self.webhooks, now)
        return TickReport(fired, published, events, deliveries)

    async def run(self, stop: asyncio.Event) -> None:
        """Tick every ``dispatcher_interval`` seconds until ``stop`` is set."""
        heartbeat = Path(self.settings.dispatcher_heartbeat_file)
        while not stop.is_set():
            try:
                await self.tick()
            except DB_ERRORS as exc:
                log.warning("dispatcher tick failed, retrying next tick: %r", exc)
            except Exception:
                # A dispatcher that dies on what it did not foresee stops every schedule;
                # one that logs it and ticks again stops only what keeps failing.
                log.exception("dispatcher tick failed unexpectedly, retrying next tick")
            else:
                await asyncio.to_thread(heartbeat.touch)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.dispatcher_interval)


async def serve(settings: Settings) -> None:
    pool = await create_pool(settings.database_url, max_size=2)
    publisher = AmqpPublisher(settings)
    await publisher.start()
    sender = WebhookSender(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("dispatcher started; ticking every %ss", settings.dispatcher_interval)
    try:
        await Dispatcher(settings, pool, publisher, sender).run(stop)
    finally:
        await sender.close()
        await publisher.close()
        await pool.close()
        log.info("dispatcher stopped")


def main() -> None:
    settings = load_settings()
    configure_logging(settings.log_level, "dispatcher", settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
