"""Run-now and the webhook endpoints through the real app (in process, over ASGI) on the real
PostgreSQL, Redis and RabbitMQ: per-key limits, a refused run that leaves nothing behind,
redelivery to a disabled endpoint, and re-enabling it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from api_service.app import create_app
from shared.settings import Settings
from shared.store import ScanStore
from tests.conftest import auth, delete_queues

NIGHTLY = {"target": "127.0.0.1", "ports": "22", "cron": "0 3 1 1 *"}


@pytest.fixture
async def own_settings(settings: Settings, database: str) -> AsyncIterator[Settings]:
    tag = secrets.token_hex(3)
    own = settings.model_copy(
        update={
            "queue_prefix": f"{settings.queue_prefix}-runnow-{tag}",
            "redis_prefix": f"{settings.redis_prefix}runnow-{tag}:",
            "max_active_scans": 1,
        }
    )
    yield own
    await delete_queues(own)


@pytest.fixture
async def client(own_settings: Settings, api_key: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(own_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://api.test", headers=auth(api_key)
        ) as client:
            yield client


@pytest.fixture
async def schedule(client: httpx.AsyncClient, store: ScanStore) -> AsyncIterator[dict[str, Any]]:
    created = await client.post("/api/schedules", json=NIGHTLY)
    assert created.status_code == 201, created.text
    body: dict[str, Any] = created.json()
    yield body
    await store.pool.execute("DELETE FROM scans WHERE schedule_id = $1", body["id"])
    await store.pool.execute("DELETE FROM schedules WHERE id = $1", body["id"])


async def test_run_now_takes_an_active_slot_like_a_submission(
    client: httpx.AsyncClient, schedule: dict[str, Any], store: ScanStore
) -> None:
    first = await client.post(f"/api/schedules/{schedule['id']}/run")
    assert first.status_code == 202, first.text
    second = await client.post(f"/api/schedules/{schedule['id']}/run")
    assert second.status_code == 429
    assert "already queued or running" in second.json()["error"]["message"]
    runs = await store.pool.fetchval(
        "SELECT count(*) FROM scans WHERE schedule_id = $1", schedule["id"]
    )
    assert runs == 1


async def test_a_refused_run_now_records_nothing(
    client: httpx.AsyncClient, schedule: dict[str, Any], store: ScanStore
) -> None:
    # The policy changed since the schedule was written (here: its exclusions).
    await store.pool.execute(
        "UPDATE schedules SET exclude = '{127.0.0.0/8}' WHERE id = $1", schedule["id"]
    )
    refused = await client.post(f"/api/schedules/{schedule['id']}/run")
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "target_denied"
    runs = await store.pool.fetchval(
        "SELECT count(*) FROM scans WHERE schedule_id = $1", schedule["id"]
    )
    assert runs == 0
    # The slot it was admitted to is given back: a good run goes through.
    await store.pool.execute("UPDATE schedules SET exclude = '{}' WHERE id = $1", schedule["id"])
    assert (await client.post(f"/api/schedules/{schedule['id']}/run")).status_code == 202


async def test_run_now_of_no_such_schedule_is_404_and_critical_is_refused(
    client: httpx.AsyncClient,
) -> None:
    missing = await client.post("/api/schedules/00000000-0000-0000-0000-000000000000/run")
    assert missing.status_code == 404
    bad_id = await client.post("/api/schedules/not-a-uuid/run")
    assert bad_id.status_code == 404
    critical = await client.post("/api/schedules", json={**NIGHTLY, "priority": "critical"})
    assert critical.status_code == 422
    assert critical.json()["error"]["field"] == "priority"


async def test_redeliver_to_a_disabled_webhook_is_409_until_it_is_re_enabled(
    client: httpx.AsyncClient, store: ScanStore
) -> None:
    created = await client.post(
        "/api/webhooks",
        json={"url": "https://93.184.215.14/hook", "events": ["scan.completed"]},
    )
    assert created.status_code == 201, created.text
    webhook_id = created.json()["id"]
    try:
        message_id = "msg_" + secrets.token_hex(16)
        await store.pool.execute(
            "INSERT INTO webhook_messages (id, webhook_id, event_type, payload, state)"
            " VALUES ($1, $2, 'scan.completed', '{}', 'failed')",
            message_id,
            webhook_id,
        )
        await store.pool.execute(
            "UPDATE webhooks SET enabled = false, disabled_reason = '410' WHERE id = $1",
            webhook_id,
        )
        redeliver = f"/api/webhooks/{webhook_id}/deliveries/{message_id}/redeliver"
        disabled = await client.post(redeliver)
        assert disabled.status_code == 409
        assert disabled.json()["error"]["code"] == "webhook_disabled"
        enabled = await client.patch(f"/api/webhooks/{webhook_id}", json={"enabled": True})
        assert enabled.status_code == 200
        assert (enabled.json()["enabled"], enabled.json()["disabled_reason"]) == (True, None)
        assert (await client.post(redeliver)).status_code == 202
    finally:
        await store.pool.execute("DELETE FROM webhooks WHERE id = $1", webhook_id)
