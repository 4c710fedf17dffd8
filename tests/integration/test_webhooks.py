"""Webhook messages on the real PostgreSQL, sent to a receiver on loopback that verifies each
signature with ``standardwebhooks``. Time is passed in explicitly: a retry due in 30 minutes
is tried by ticking at that time, not by waiting for it."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import asyncpg
import pytest

from api_service.webhook_sender import WebhookSender
from shared.schedule_store import ScheduleStore
from shared.schedules import ScheduleCreate
from shared.schemas import PortResult, ScanConfig, ScanResult
from shared.settings import Settings
from shared.store import create_pool
from shared.webhook_store import WebhookStore
from shared.webhooks import WebhookCreate, WebhookCreated
from tests import needs
from tests.support.keys import own_key, revoke
from tests.support.webhook_receiver import Receiver, webhook_receiver

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool[Any]]:
    pool = await create_pool(database, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def owner(pool: asyncpg.Pool[Any]) -> AsyncIterator[UUID]:
    async with own_key(pool, "webhooks-test") as key_id:
        yield key_id


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture
async def sender(settings: Settings) -> AsyncIterator[WebhookSender]:
    own = settings.model_copy(update={"webhook_allow_networks": LOOPBACK})
    sender = WebhookSender(own)
    yield sender
    await sender.close()


async def hook(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, *events: str, url: str = ""
) -> WebhookCreated:
    spec = WebhookCreate.model_validate(
        {"url": url or receiver.url, "events": list(events) or ["scan.completed"]}
    )
    created = await WebhookStore(pool).create(owner, spec, limit=20)
    assert created is not None
    receiver.secret = created.secret
    return created


async def finish_scan(
    pool: asyncpg.Pool[Any],
    owner: UUID,
    open_ports: list[int],
    target: str = "127.0.0.1",
    *,
    ports: str = "1-1000",
    schedule_id: UUID | None = None,
) -> UUID:
    """A scan of the key that runs and completes, through the same UPDATEs a worker makes."""
    scan_id = uuid4()
    await pool.execute(
        "INSERT INTO scans (id, task_id, target, ports, config, priority, api_key_id,"
        " schedule_id, scheduled_for) VALUES ($1, $2, $3, $4, $5, 'normal', $6, $7,"
        " CASE WHEN $7::uuid IS NULL THEN NULL ELSE now() END)",
        scan_id,
        uuid4(),
        target,
        ports,
        ScanConfig().model_dump(mode="json"),
        owner,
        schedule_id,
    )
    now = datetime.now(UTC)
    result = ScanResult(
        scan_id=scan_id,
        target=target,
        addresses=[target],
        ports=ports,
        total_ports_scanned=1000,
        open_ports=[PortResult(port=p, state="open", address=target) for p in open_ports],
        started_at=now,
        finished_at=now,
        duration_seconds=0.0,
    )
    await pool.execute("UPDATE scans SET state = 'running' WHERE id = $1", scan_id)
    await pool.execute(
        "UPDATE scans SET state = 'completed', result = $2, finished_at = now() WHERE id = $1",
        scan_id,
        result.model_dump(mode="json"),
    )
    return scan_id


def soon() -> datetime:
    """A moment just after every message written so far became due (the database's clock
    stamps them; a second's margin covers the two clocks' difference)."""
    return datetime.now(UTC) + timedelta(seconds=1)


async def tick(store: WebhookStore, sender: WebhookSender, now: datetime) -> int:
    await store.collect_events()
    return await sender.deliver_due(store, now)


async def test_ports_changed_only_when_something_changed(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, sender: WebhookSender
) -> None:
    store = WebhookStore(pool)
    await hook(pool, owner, receiver, "ports.changed", "scan.completed")
    now = soon()
    await finish_scan(pool, owner, [22, 80])  # the first: nothing to compare with
    await finish_scan(pool, owner, [22, 80])  # the same ports
    await tick(store, sender, now)
    changed_scan = await finish_scan(pool, owner, [22, 80, 443])
    await finish_scan(pool, owner, [22, 80, 443])
    await tick(store, sender, now)

    events = receiver.events()
    assert [e["type"] for e in events].count("scan.completed") == 4
    changed = [e for e in events if e["type"] == "ports.changed"]
    assert len(changed) == 1
    diff = changed[0]["data"]["diff"]
    assert changed[0]["data"]["scan_id"] == str(changed_scan)
    assert [(p["address"], p["port"]) for p in diff["newly_open"]] == [("127.0.0.1", 443)]
    assert diff["newly_closed"] == []
    assert diff["changed"] == []


async def test_500_three_times_then_200_is_delivered_on_the_retry(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, sender: WebhookSender
) -> None:
    store = WebhookStore(pool)
    created = await hook(pool, owner, receiver)
    receiver.statuses = [500, 500, 500]
    await finish_scan(pool, owner, [22])
    now = soon()
    await tick(store, sender, now)
    # Standard Webhooks' schedule: 5 s, then 5 min, then 30 min.
    assert await tick(store, sender, now + timedelta(seconds=4)) == 0
    for offset in (5, 5 + 300, 5 + 300 + 1800):
        assert await tick(store, sender, now + timedelta(seconds=offset, milliseconds=1)) == 1
    assert [r.answered for r in receiver.received] == [500, 500, 500, 200]
    assert len(receiver.events()) == 1
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1

    deliveries = await store.deliveries(created.id)
    assert len(deliveries) == 1
    assert deliveries[0].state == "delivered"
    assert [a.status_code for a in deliveries[0].history] == [500, 500, 500, 200]
    assert await store.failing_since(created.id) is None


async def test_a_redirect_is_a_failure_and_is_not_followed(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, sender: WebhookSender
) -> None:
    store = WebhookStore(pool)
    created = await hook(pool, owner, receiver)
    receiver.statuses = [302]
    await finish_scan(pool, owner, [22])
    await tick(store, sender, soon())
    assert [r.answered for r in receiver.received] == [302]
    (delivery,) = await store.deliveries(created.id)
    assert delivery.state == "pending"
    assert delivery.history[0].error is not None
    assert "redirects are not followed" in delivery.history[0].error


async def test_retry_after_is_honoured(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, sender: WebhookSender
) -> None:
    store = WebhookStore(pool)
    created = await hook(pool, owner, receiver)
    receiver.statuses, receiver.retry_after = [503], "600"
    await finish_scan(pool, owner, [22])
    now = soon()
    await tick(store, sender, now)
    (delivery,) = await store.deliveries(created.id)
    assert delivery.next_attempt_at is not None
    assert delivery.next_attempt_at - now >= timedelta(seconds=600)
    assert await tick(store, sender, now + timedelta(seconds=300)) == 0
    assert await tick(store, sender, now + timedelta(seconds=601)) == 1


async def test_410_disables_the_endpoint(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, sender: WebhookSender
) -> None:
    store = WebhookStore(pool)
    created = await hook(pool, owner, receiver)
    receiver.statuses = [410]
    await finish_scan(pool, owner, [22])
    await tick(store, sender, soon())
    found = await store.get(owner, created.id)
    assert found is not None
    assert not found.enabled
    assert found.disabled_reason == "the receiver answered 410 Gone"
    await finish_scan(pool, owner, [22])
    await tick(store, sender, soon() + timedelta(hours=1))
    assert len(receiver.received) == 1

    # Redelivering to a disabled endpoint queues nothing; re-enabling it starts afresh.
    (gone, *_rest) = await store.deliveries(created.id)
    assert await store.redeliver(created.id, gone.id) == "disabled"
    enabled = await store.set_enabled(owner, created.id, True)
    assert enabled is not None
    assert (enabled.enabled, enabled.disabled_reason, enabled.failing_since) == (True, None, None)
    assert await store.redeliver(created.id, gone.id) == "queued"
    await tick(store, sender, soon() + timedelta(hours=1))
    assert [r.answered for r in receiver.received] == [410, 200]


async def test_an_endpoint_failing_for_days_is_disabled_and_reported(
    pool: asyncpg.Pool[Any],
    owner: UUID,
    receiver: Receiver,
    sender: WebhookSender,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = WebhookStore(pool)
    created = await hook(pool, owner, receiver)
    receiver.statuses = [500] * 10
    await finish_scan(pool, owner, [22])
    now = soon()
    await tick(store, sender, now)
    await finish_scan(pool, owner, [22])
    await tick(store, sender, now + timedelta(days=6))
    found = await store.get(owner, created.id)
    assert found is not None
    assert not found.enabled
    assert found.disabled_reason is not None
    assert "every delivery failed since" in found.disabled_reason
    assert any("disabled" in r.getMessage() for r in caplog.records)


async def test_loopback_is_refused_without_the_operator_allowance(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, settings: Settings
) -> None:
    store = WebhookStore(pool)
    created = await hook(pool, owner, receiver)
    strict = WebhookSender(settings)  # no CYBERSEC_WEBHOOK_ALLOW_NETWORKS
    try:
        await finish_scan(pool, owner, [22])
        await tick(store, strict, soon())
    finally:
        await strict.close()
    assert receiver.received == []
    (delivery,) = await store.deliveries(created.id)
    assert delivery.history[0].error is not None
    assert "not an address webhooks may be sent to" in delivery.history[0].error


async def test_a_name_is_connected_to_at_the_checked_address_with_its_host_header(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, sender: WebhookSender
) -> None:
    store = WebhookStore(pool)
    await hook(pool, owner, receiver, url=f"http://localhost:{receiver.port}/hook")
    await finish_scan(pool, owner, [22])
    await tick(store, sender, soon())
    (request,) = receiver.received
    headers = {k.lower(): v for k, v in request.headers.items()}
    assert headers["host"] == f"localhost:{receiver.port}"
    assert headers["webhook-signature"].startswith("v1,")
    assert len(receiver.events()) == 1


async def test_a_failed_scan_and_a_redelivery(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, sender: WebhookSender
) -> None:
    store = WebhookStore(pool)
    created = await hook(pool, owner, receiver, "scan.failed", "scan.completed")
    scan_id = uuid4()
    await pool.execute(
        "INSERT INTO scans (id, task_id, target, ports, config, priority, api_key_id)"
        " VALUES ($1, $2, '127.0.0.1', '22', $3, 'normal', $4)",
        scan_id,
        uuid4(),
        ScanConfig().model_dump(mode="json"),
        owner,
    )
    await pool.execute(
        "UPDATE scans SET state = 'failed', error = 'time limit exceeded' WHERE id = $1", scan_id
    )
    await tick(store, sender, soon())
    (event,) = receiver.events()
    assert (event["type"], event["data"]["error"]) == ("scan.failed", "time limit exceeded")

    (delivery,) = await store.deliveries(created.id)
    assert await store.redeliver(created.id, delivery.id) == "queued"
    await tick(store, sender, soon())
    assert [e["type"] for e in receiver.events()] == ["scan.failed", "scan.failed"]
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    assert await store.redeliver(created.id, "msg_unknown") == "missing"


async def test_https_to_a_name_checks_the_certificate_for_that_name(
    pool: asyncpg.Pool[Any], owner: UUID, settings: Settings, tmp_path: Path
) -> None:
    """The connection goes to the checked address, and TLS still verifies the URL's name."""
    openssl = needs.tool("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    await asyncio.to_thread(
        subprocess.run,
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    own = settings.model_copy(update={"webhook_allow_networks": LOOPBACK})
    sender = WebhookSender(own, verify=trusting)
    store = WebhookStore(pool)
    try:
        with webhook_receiver(tls=server_tls) as receiver:
            by_name = await hook(pool, owner, receiver, url=f"https://localhost:{receiver.port}/h")
            await finish_scan(pool, owner, [22])
            await tick(store, sender, soon())
            assert len(receiver.events()) == 1
            # The certificate names localhost, not 127.0.0.1: an IP URL fails verification.
            await WebhookStore(pool).delete(owner, by_name.id)
            by_address = await hook(pool, owner, receiver)
            await finish_scan(pool, owner, [22])
            await tick(store, sender, soon())
            (delivery,) = await store.deliveries(by_address.id)
            assert delivery.history[0].status_code is None
            assert "CERTIFICATE_VERIFY_FAILED" in (delivery.history[0].error or "")
            assert len(receiver.received) == 1
    finally:
        await sender.close()


async def test_a_revoked_key_gets_no_more_messages(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, sender: WebhookSender
) -> None:
    store = WebhookStore(pool)
    created = await hook(pool, owner, receiver)
    await finish_scan(pool, owner, [22])
    await store.collect_events()  # a message owed before the revocation is not sent either
    await revoke(pool, owner)
    await finish_scan(pool, owner, [22])
    await tick(store, sender, soon() + timedelta(days=1))
    assert receiver.received == []
    assert [d.attempts for d in await store.deliveries(created.id)] == [0]


async def test_concurrent_creates_stay_within_the_keys_bound(
    pool: asyncpg.Pool[Any], owner: UUID
) -> None:
    store = WebhookStore(pool)
    spec = WebhookCreate(url="https://hooks.example.com/x", events=["scan.completed"])
    made = await asyncio.gather(*(store.create(owner, spec, limit=5) for _ in range(20)))
    assert sum(1 for m in made if m is not None) == 5
    assert len(await store.owned(owner)) == 5


async def test_an_ad_hoc_scan_between_two_nightly_runs_changes_nothing(
    pool: asyncpg.Pool[Any], owner: UUID, receiver: Receiver, sender: WebhookSender
) -> None:
    """The nightly run is compared with the previous nightly run, not with the ad-hoc scan of
    one port in between."""
    nightly = await ScheduleStore(pool).create(
        owner,
        ScheduleCreate(target="127.0.0.1", ports="1-65535", cron="0 3 * * *"),
        datetime.now(UTC),
        limit=5,
    )
    assert nightly is not None
    await hook(pool, owner, receiver, "ports.changed", "scan.completed")
    await finish_scan(pool, owner, [22, 80], ports="1-65535", schedule_id=nightly.id)
    await finish_scan(pool, owner, [22], ports="22")
    await finish_scan(pool, owner, [22, 80], ports="1-65535", schedule_id=nightly.id)
    await tick(store := WebhookStore(pool), sender, soon())
    await tick(store, sender, soon())
    assert [e["type"] for e in receiver.events()] == ["scan.completed"] * 3
