"""Publishes protocol-v2 task messages with aio-pika on one long-lived channel, with confirms.

Requests share the channel, so their confirms are pipelined: each request awaits only its own.
Messages go straight to the channel's aiormq layer with prebuilt properties: aio-pika's
``Message`` and ``Exchange.publish`` add nothing the gateway uses.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Protocol, cast

import aio_pika
import aiormq
from aio_pika.abc import AbstractRobustChannel, AbstractRobustConnection
from aio_pika.exceptions import AMQPError

from shared.protocol import TaskMessage, queue_arguments, queue_for
from shared.settings import Settings

log = logging.getLogger(__name__)


class PublishFailed(Exception):
    """The broker did not confirm the message: it may not be queued, so it was not accepted."""


class TaskPublisher(Protocol):
    async def publish(self, message: TaskMessage) -> None: ...

    async def ready(self) -> bool: ...


class AmqpPublisher:
    """The gateway's only path to RabbitMQ."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            await self._ensure_channel()
        except PublishFailed as exc:
            log.warning("broker not reachable at start, will retry on demand: %s", exc)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
        self._connection = self._channel = None

    async def _ensure_channel(self) -> AbstractRobustChannel:
        connection = self._connection
        if connection is not None and not connection.connected.is_set():
            # The robust connection is reconnecting in the background: answer now rather than
            # queue the request behind it, so clients get a 503 at once, not after a timeout.
            raise PublishFailed("broker connection lost; reconnecting")
        channel = self._channel
        if channel is not None and not channel.is_closed:
            return channel
        async with self._lock:
            if self._channel is not None and not self._channel.is_closed:
                return self._channel
            timeout = self.settings.publish_timeout
            try:
                if self._connection is None:
                    self._connection = await aio_pika.connect_robust(
                        self.settings.broker_url, timeout=timeout
                    )
                channel = await asyncio.wait_for(
                    self._connection.channel(publisher_confirms=True), timeout
                )
                assert isinstance(channel, AbstractRobustChannel)
                await channel.declare_queue(
                    self.settings.dead_letter_queue, durable=True, timeout=timeout
                )
                for queue in (self.settings.scan_queue, self.settings.critical_queue):
                    await channel.declare_queue(
                        queue,
                        durable=True,
                        arguments=queue_arguments(self.settings.dead_letter_queue),
                        timeout=timeout,
                    )
            except (AMQPError, OSError, TimeoutError) as exc:
                if self._connection is not None and self._channel is None:
                    await self._connection.close()
                    self._connection = None
                raise PublishFailed(f"broker unavailable: {exc!r}") from exc
            self._channel = channel
            return channel

    async def publish(self, message: TaskMessage) -> None:
        """Publish and wait for the broker's confirm; raises :class:`PublishFailed` otherwise."""
        channel = await self._ensure_channel()
        properties = aiormq.spec.Basic.Properties(
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=message.headers,
            delivery_mode=2,  # persistent
            priority=message.priority,
            correlation_id=message.correlation_id,
            # The task id is unique: it spares aiormq generating a message id per publish.
            message_id=message.correlation_id,
        )
        try:
            underlay = cast(aiormq.Channel, await channel.get_underlay_channel())
            # One deadline covers the write and the confirm; a nack, a return (mandatory:
            # unroutable) or the channel closing raises. wait=False: the confirm implies the
            # frames were written, so waiting for the write as well only costs a wakeup.
            await underlay.basic_publish(
                message.body,
                routing_key=queue_for(
                    message.priority, self.settings.scan_queue, self.settings.critical_queue
                ),
                properties=properties,
                mandatory=True,
                timeout=self.settings.publish_timeout,
                wait=False,
            )
        except (AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise PublishFailed(f"broker did not confirm: {exc!r}") from exc

    async def ready(self) -> bool:
        try:
            await self._ensure_channel()
        except PublishFailed:
            return False
        return self._connection is not None and not self._connection.is_closed
