"""Looking at the real broker from tests."""

from __future__ import annotations

import aio_pika

from shared.settings import Settings


async def queued_messages(settings: Settings) -> int:
    """Messages waiting in the settings' scan queue."""
    connection = await aio_pika.connect(settings.broker_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(settings.scan_queue, ensure=True)
        declared = await queue.declare()
        count = declared.message_count
        assert count is not None
        return count
