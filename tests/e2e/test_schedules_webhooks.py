"""A schedule's runs on a real worker, alerts to a real receiver that verifies signatures with
``standardwebhooks``; then a delivery that survives the API, worker and dispatcher restarting
while it waits for a retry."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner, Result

from api_service.dispatcher import Dispatcher
from api_service.publisher import AmqpPublisher
from bench._stack import settings_env
from cybersec_cli import main
from shared.keys import KeyStore
from shared.schedule_store import ScheduleStore
from shared.schedules import ScheduleCreate
from shared.settings import Settings
from shared.store import ScanStore
from tests.conftest import (
    Process,
    auth,
    base_url,
    delete_queues,
    own_stack,
    start_api,
    variant,
)
from tests.support.broker import queued_messages
from tests.support.webhook_receiver import Receiver, webhook_receiver

pytestmark = pytest.mark.e2e

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.fixture(scope="module")
def hooks_settings(settings: Settings, run_dir: Path) -> Settings:
    # The run's queue: the session's worker runs this gateway's scans.
    return variant(
        settings,
        "hooks",
        run_dir,
        queue_prefix=settings.queue_prefix,
        webhook_allow_networks=LOOPBACK,
    )


@pytest.fixture(scope="module")
def hooks_api(hooks_settings: Settings, run_dir: Path, database: str) -> Iterator[str]:
    process = start_api(hooks_settings, run_dir / "api-hooks.log")
    try:
        yield base_url(hooks_settings)
    finally:
        process.stop()


@pytest.fixture
async def fresh_key(store: ScanStore) -> str:
    """A key of its own: "the previous scan of the target" is then this test's."""
    return await KeyStore(store.pool).create("schedules-e2e")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with webhook_receiver() as r:
        yield r


@pytest.fixture
async def dispatcher(hooks_settings: Settings, store: ScanStore) -> AsyncIterator[Dispatcher]:
    publisher = AmqpPublisher(hooks_settings)
    await publisher.start()
    dispatcher = Dispatcher(hooks_settings, store.pool, publisher)
    yield dispatcher
    await dispatcher.sender.close()
    await publisher.close()


def schedule_spec() -> ScheduleCreate:
    return ScheduleCreate(target="127.0.0.1", ports="1", cron="0 0 1 1 *")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def poll(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    pytest.fail(f"{what} within {timeout}s")


async def test_a_port_opening_between_runs_sends_exactly_one_ports_changed(
    hooks_api: str,
    worker: Process,
    fresh_key: str,
    receiver: Receiver,
    dispatcher: Dispatcher,
    listeners: list[int],
) -> None:
    later = closed_port()
    ports = ",".join(map(str, [*listeners[:2], later]))
    async with httpx.AsyncClient(base_url=hooks_api, headers=auth(fresh_key), timeout=10) as api:
        created = await api.post(
            "/api/schedules",
            json={
                "target": "127.0.0.1",
                "ports": ports,
                "cron": "*/5 * * * *",
                "timezone": "Europe/Berlin",
                "config": {"service_detection": False, "timeout": 0.5},
            },
        )
        assert created.status_code == 201, created.text
        schedule = created.json()
        hook = await api.post(
            "/api/webhooks",
            json={
                "url": receiver.url,
                "events": ["ports.changed", "scan.completed"],
                "schedule_id": schedule["id"],
            },
        )
        assert hook.status_code == 201, hook.text
        assert hook.json()["secret"].startswith("whsec_")
        receiver.secret = hook.json()["secret"]
        first = datetime.fromisoformat(schedule["next_run_at"])

        async def run(n: int) -> None:
            """Tick at the n-th run's time, then until its scan completed and was announced."""
            now = first + timedelta(minutes=5 * n)
            fired = await dispatcher.tick(now)
            assert len(fired.fired) == 1

            async def announced() -> bool:
                await dispatcher.tick(now + timedelta(seconds=2))
                return len(receiver.events()) >= n + 1 + (1 if n == 2 else 0)

            await poll(f"run {n} announced", announced)

        try:
            await run(0)
            await run(1)
            with socket.create_server(("127.0.0.1", later)):
                await run(2)
            listed = await api.get("/api/scans", params={"schedule_id": schedule["id"]})
            assert listed.status_code == 200
            assert [s["state"] for s in listed.json()["items"]] == ["completed"] * 3
        finally:
            await api.delete(f"/api/schedules/{schedule['id']}")

    events = receiver.events()
    assert [e["type"] for e in events].count("scan.completed") == 3
    changed = [e for e in events if e["type"] == "ports.changed"]
    assert len(changed) == 1
    diff = changed[0]["data"]["diff"]
    assert [(p["address"], p["port"]) for p in diff["newly_open"]] == [("127.0.0.1", later)]
    assert diff["newly_closed"] == diff["changed"] == []


def start_dispatcher(settings: Settings, log: Path) -> Process:
    return Process([sys.executable, "-m", "api_service.dispatcher"], settings_env(settings), log)


def test_a_delivery_waiting_for_its_retry_survives_a_restart_and_arrives_once(
    settings: Settings, run_dir: Path, database: str, api_key: str
) -> None:
    changes: dict[str, Any] = {
        "webhook_allow_networks": LOOPBACK,
        "webhook_retry_schedule": "1,1,1,1,1,1",
        "dispatcher_interval": 0.2,
        "dispatcher_heartbeat_file": str(run_dir / "dispatcher.heartbeat"),
    }
    with webhook_receiver(statuses=[500] * 50) as receiver:
        with own_stack(settings, run_dir, "retry-a", workers=1, **changes) as own:
            dispatcher = start_dispatcher(own, run_dir / "dispatcher-a.log")
            try:
                with httpx.Client(base_url=base_url(own), headers=auth(api_key)) as api:
                    schedule = api.post(
                        "/api/schedules",
                        json={
                            "target": "127.0.0.1",
                            "ports": "1",
                            "cron": "0 0 1 1 *",
                            "config": {"service_detection": False},
                        },
                    ).json()
                    hook = api.post(
                        "/api/webhooks",
                        json={
                            "url": receiver.url,
                            "events": ["scan.completed"],
                            "schedule_id": schedule["id"],
                        },
                    ).json()
                    receiver.secret = hook["secret"]
                    ran = api.post(f"/api/schedules/{schedule['id']}/run")
                    assert ran.status_code == 202, ran.text
                    receiver.wait_for(2, answered=500)
            finally:
                dispatcher.stop()
        # Everything is down; the message waits in PostgreSQL. Now the receiver recovers.
        with receiver.lock:
            receiver.statuses.clear()
        with own_stack(settings, run_dir, "retry-b", workers=1, **changes) as own:
            dispatcher = start_dispatcher(own, run_dir / "dispatcher-b.log")
            try:
                receiver.wait_for(1, answered=200)
                with httpx.Client(base_url=base_url(own), headers=auth(api_key)) as api:
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:
                        items = api.get(f"/api/webhooks/{hook['id']}/deliveries").json()["items"]
                        if items and items[0]["state"] == "delivered":
                            break
                        time.sleep(0.05)
                    assert [d["state"] for d in items] == ["delivered"]
                    history = [a["status_code"] for a in items[0]["history"]]
                    assert history[-1] == 200
                    assert history.count(200) == 1
                    api.delete(f"/api/schedules/{schedule['id']}")
            finally:
                dispatcher.stop()
    delivered = receiver.events(answered=200)
    assert len(delivered) == 1
    assert delivered[0]["type"] == "scan.completed"
    assert delivered[0]["data"]["schedule_id"] == schedule["id"]


def test_schedules_and_webhooks_belong_to_their_key_and_refuse_bad_input(
    hooks_api: str, api_key: str, other_api_key: str
) -> None:
    with (
        httpx.Client(base_url=hooks_api, headers=auth(api_key), timeout=10) as api,
        httpx.Client(base_url=hooks_api, headers=auth(other_api_key), timeout=10) as other,
    ):
        body = {"target": "127.0.0.1", "ports": "22", "cron": "30 2 * * *", "timezone": "UTC"}
        created = api.post("/api/schedules", json=body)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]
        try:
            assert other.get(f"/api/schedules/{sid}").status_code == 404
            assert other.patch(f"/api/schedules/{sid}", json={"enabled": False}).status_code == 404
            assert other.post(f"/api/schedules/{sid}/run").status_code == 404
            assert sid not in [s["id"] for s in other.get("/api/schedules").json()["items"]]

            paused = api.patch(f"/api/schedules/{sid}", json={"enabled": False})
            assert paused.status_code == 200
            assert paused.json()["next_run_at"] is None
            resumed = api.patch(f"/api/schedules/{sid}", json={"enabled": True})
            assert resumed.json()["next_run_at"] is not None
            to_interval = api.patch(f"/api/schedules/{sid}", json={"interval_seconds": 3600})
            assert to_interval.status_code == 200
            assert (to_interval.json()["cron"], to_interval.json()["interval_seconds"]) == (
                None,
                3600,
            )

            for bad in (
                {**body, "cron": "61 * * * *"},
                {**body, "timezone": "Europe/Atlantis"},
                {**body, "ports": "0-5"},
                {**body, "target": "127.0.0.0/8"},
                {**body, "interval_seconds": 3600},
                {**body, "surprise": 1},
            ):
                answer = api.post("/api/schedules", json=bad)
                assert answer.status_code == 422, (bad, answer.text)
                assert answer.json()["error"]["code"] == "validation_error"
            for change in (
                {"interval_seconds": None},
                {"target": "not a target"},
                {"ports": "99999"},
            ):
                answer = api.patch(f"/api/schedules/{sid}", json=change)
                assert answer.status_code == 422, (change, answer.text)
            assert api.get("/api/schedules/not-a-uuid").status_code == 404
            ran = api.post(f"/api/schedules/{sid}/run")
            assert ran.status_code == 202
            assert ran.headers["location"] == f"/api/scan/{ran.json()['task_id']}"
            for refused in (
                api.patch(f"/api/schedules/{sid}", json={"target": "127.0.0.66"}),
                api.patch(f"/api/schedules/{sid}", json={"exclude": ["127.0.0.0/30"]}),
                api.post("/api/schedules", json={**body, "target": "169.254.169.254"}),
            ):
                assert refused.status_code == 403, refused.text
                assert refused.json()["error"]["code"] == "target_denied"
            assert api.get(f"/api/schedules/{sid}").json()["target"] == "127.0.0.1"
        finally:
            assert api.delete(f"/api/schedules/{sid}").status_code == 204
        assert api.get(f"/api/schedules/{sid}").status_code == 404

        for url in (
            "http://10.0.0.1/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://0x7f.1/",
            "ftp://example.com/",
        ):
            answer = api.post("/api/webhooks", json={"url": url, "events": ["scan.completed"]})
            assert answer.status_code == 422, (url, answer.text)
        created_hook = api.post(
            "/api/webhooks", json={"url": "http://127.0.0.1:9/hook", "events": ["ports.changed"]}
        )
        assert created_hook.status_code == 201
        hid = created_hook.json()["id"]
        assert "secret" not in api.get(f"/api/webhooks/{hid}").json()
        assert other.get(f"/api/webhooks/{hid}/deliveries").status_code == 404
        assert api.get(f"/api/webhooks/{hid}/deliveries").json() == {"items": []}
        assert api.post(f"/api/webhooks/{hid}/deliveries/msg_x/redeliver").status_code == 404
        assert api.delete(f"/api/webhooks/{hid}").status_code == 204


def test_the_schedule_and_webhook_commands(hooks_api: str, api_key: str) -> None:
    def cli(*args: str) -> Result:
        result = CliRunner().invoke(main.app, [*args, "--api-url", hooks_api, "--api-key", api_key])
        assert result.exit_code == 0, (args, result.stdout, result.stderr)
        return result

    created = cli(
        "schedule", "create", "127.0.0.1", "--cron", "30 2 * * *", "--tz", "Europe/Berlin",
        "-p", "22,80", "--name", "nightly", "--misfire", "run_once",
    )  # fmt: skip
    sid = created.stdout.strip()
    try:
        listed = json.loads(cli("schedule", "list", "--json").stdout)["items"]
        assert [i["name"] for i in listed if i["id"] == sid] == ["nightly"]
        cli("schedule", "list")
        shown = json.loads(cli("schedule", "show", sid, "--json").stdout)
        assert (shown["cron"], shown["timezone"], shown["misfire_policy"]) == (
            "30 2 * * *",
            "Europe/Berlin",
            "run_once",
        )
        assert "paused" in cli("schedule", "pause", sid).stdout
        assert "resumed" in cli("schedule", "resume", sid).stdout
        task_id = cli("schedule", "run-now", sid).stdout.strip()
        assert len(task_id) == 36
        hook = cli("webhook", "create", "http://127.0.0.1:9/hook", "--schedule", sid).stdout
        hook_id, secret = hook.split()
        assert secret.startswith("whsec_")
        assert secret not in cli("webhook", "list", "--json").stdout
        assert json.loads(cli("webhook", "deliveries", hook_id, "--json").stdout) == {"items": []}
        cli("webhook", "delete", hook_id)
    finally:
        cli("schedule", "delete", sid)
    missing = CliRunner().invoke(
        main.app, ["schedule", "show", sid, "--api-url", hooks_api, "--api-key", api_key]
    )
    assert missing.exit_code == 4


async def test_two_dispatcher_processes_fire_each_due_run_once(
    settings: Settings, run_dir: Path, store: ScanStore, fresh_key: str
) -> None:
    """Two real dispatchers ticking every 50 ms over the same due schedules."""
    own = variant(
        settings,
        "two-dispatchers",
        run_dir,
        dispatcher_interval=0.05,
        dispatcher_heartbeat_file=str(run_dir / "two-dispatchers.heartbeat"),
    )
    owner = await KeyStore(store.pool).lookup(fresh_key)
    assert owner is not None
    schedules = ScheduleStore(store.pool)
    count = 20
    created = [
        await schedules.create(owner, schedule_spec(), datetime.now(UTC), limit=count)
        for _ in range(count)
    ]
    ids = [s.id for s in created if s is not None]
    assert len(ids) == count
    beats = [run_dir / f"two-dispatchers-{n}.heartbeat" for n in range(2)]
    dispatchers = [
        start_dispatcher(
            own.model_copy(update={"dispatcher_heartbeat_file": str(beat)}),
            run_dir / f"two-dispatchers-{n}.log",
        )
        for n, beat in enumerate(beats)
    ]
    try:
        # Both ticking before anything is due, so both race for every run.
        async def both_ticking() -> bool:
            return all(beat.exists() for beat in beats)

        await poll("both dispatchers ticking", both_ticking)
        # Due now, for both at once.
        await store.pool.execute("UPDATE schedules SET next_run_at = now() WHERE id = ANY($1)", ids)

        async def all_fired() -> bool:
            pending = await store.pool.fetchval(
                "SELECT count(*) FROM schedules WHERE id = ANY($1) AND next_run_at <= now()", ids
            )
            unsent = await store.pool.fetchval("SELECT count(*) FROM scan_publish_outbox")
            return bool(pending == 0 and unsent == 0)

        await poll("every due schedule fired and published", all_fired)
        assert await queued_messages(own) == count
    finally:
        for process in dispatchers:
            process.stop()
        runs = await store.pool.fetch(
            "SELECT schedule_id FROM scans WHERE schedule_id = ANY($1)", ids
        )
        await store.pool.execute("DELETE FROM scans WHERE schedule_id = ANY($1)", ids)
        await store.pool.execute("DELETE FROM schedules WHERE id = ANY($1)", ids)
        await delete_queues(own)
    assert sorted(r["schedule_id"] for r in runs) == sorted(ids)
    logs = [p.output() for p in dispatchers]
    assert all("dispatcher started" in log for log in logs)
