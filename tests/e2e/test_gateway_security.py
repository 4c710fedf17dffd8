"""Issue 4's rules, tried over HTTP against the running gateway and workers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import aio_pika
import asyncpg
import httpx
import pytest

from api_service.publisher import AmqpPublisher
from bench._stack import settings_env
from shared.keys import KeyStore, hash_key
from shared.protocol import LimitPolicy, build_scan_message
from shared.schemas import ScanConfig, ScanTaskPayload
from shared.settings import Settings
from shared.store import ScanStore
from tests.conftest import (
    ROOT,
    Process,
    auth,
    base_url,
    own_stack,
    start_worker,
    wait_final,
)

pytestmark = pytest.mark.e2e

FINAL = ("SUCCESS", "FAILURE", "REVOKED")


def submit(client: httpx.Client, **body: Any) -> httpx.Response:
    body.setdefault("target", "127.0.0.1")
    body.setdefault("ports", "1")
    return client.post("/api/scan", json=body)


# --- authentication --------------------------------------------------------------------------

ROUTES = [
    ("POST", "/api/scan"),
    ("GET", "/api/scans"),
    ("GET", "/api/scan/00000000-0000-0000-0000-000000000000"),
    ("DELETE", "/api/scan/00000000-0000-0000-0000-000000000000"),
    ("GET", "/api/scan/00000000-0000-0000-0000-000000000000/events"),
    ("GET", "/api/scan/00000000-0000-0000-0000-000000000000/result"),
    ("GET", "/api/scan/00000000-0000-0000-0000-000000000000/result?format=csv"),
    ("GET", "/api/scan/00000000-0000-0000-0000-000000000000/diff"),
    ("GET", "/api/scan/00000000-0000-0000-0000-000000000000/diff?against=previous"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer not-a-key", "Basic dXNlcjpwYXNz", "Bearer"])
def test_every_api_route_needs_a_valid_key(
    api: str, method: str, path: str, header: str | None
) -> None:
    headers = {"content-type": "application/json"}
    if header is not None:
        headers["authorization"] = header
    response = httpx.request(
        method, api + path, headers=headers, content=b'{"target":"127.0.0.1"}', timeout=10
    )
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_probes_and_docs_need_no_key(api: str) -> None:
    assert httpx.get(f"{api}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api}/readyz").json()
    assert ready == {"status": "ready", "checks": {"broker": True, "redis": True, "database": True}}
    spec = httpx.get(f"{api}/openapi.json").json()
    assert set(spec["paths"]) >= {
        "/api/scan",
        "/api/scans",
        "/api/scan/{task_id}",
        "/api/scan/{task_id}/events",
        "/healthz",
        "/readyz",
    }
    page = httpx.get(f"{api}/docs")
    assert page.status_code == 200
    assert "/openapi.json" in page.text


def test_docs_load_only_pinned_checked_assets_under_a_csp(api: str) -> None:
    """Before: Swagger UI from a floating CDN path (@5), no integrity digest, no CSP."""
    import re

    page = httpx.get(f"{api}/docs")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "frame-ancestors 'none'" in policy
    script_src = next(p for p in policy.split(";") if p.strip().startswith("script-src"))
    assert "'unsafe-inline'" not in script_src
    assert page.headers["x-content-type-options"] == "nosniff"
    tags = re.findall(r"<(?:script|link)\b[^>]*>", page.text)
    external = [tag for tag in tags if "https://" in tag]
    assert len(external) == 2, tags
    for tag in external:
        assert re.search(r'integrity="sha384-[A-Za-z0-9+/=]{64}"', tag), tag
        assert 'crossorigin="anonymous"' in tag
        assert re.search(r"@\d+\.\d+\.\d+/", tag), f"not pinned to one release: {tag}"
    # No inline script: every <script> has a src.
    assert all("src=" in tag for tag in tags if tag.startswith("<script"))
    init = httpx.get(f"{api}/docs/init.js")
    assert init.status_code == 200
    assert init.headers["content-type"].startswith("text/javascript")


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cybersec_cli.main", *args],
        env=settings_env(settings),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_keys_cli_creates_lists_and_revokes(
    api: str, settings: Settings, store: ScanStore
) -> None:
    name = f"cli-{uuid4().hex[:8]}"
    created = cli(settings, "keys", "create", "--name", name)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip().splitlines()[-1]
    assert key.startswith("cs_")

    # Stored only as a hash.
    row = await store.pool.fetchrow("SELECT * FROM api_keys WHERE name = $1", name)
    assert row is not None
    assert bytes(row["key_hash"]) == hashlib.sha256(key.encode()).digest()
    assert all(key not in str(value) for value in row.values())

    async with httpx.AsyncClient(base_url=api, headers=auth(key), timeout=10) as client:
        assert (await client.get("/api/scans")).status_code == 200
        listed = cli(settings, "keys", "list")
        assert listed.returncode == 0
        assert name in listed.stdout
        assert key not in listed.stdout
        revoked = cli(settings, "keys", "revoke", name)
        assert revoked.returncode == 0, revoked.stderr
        deadline = time.monotonic() + 15
        status = 200
        while time.monotonic() < deadline and status != 401:
            status = (await client.get("/api/scans")).status_code
        assert status == 401


# --- ownership -------------------------------------------------------------------------------


def test_a_key_sees_only_its_own_scans(
    client: httpx.Client, api: str, other_api_key: str, worker: Process
) -> None:
    response = submit(client, ports="1-3")
    assert response.status_code == 202
    task_id = response.json()["task_id"]
    with httpx.Client(base_url=api, headers=auth(other_api_key), timeout=10) as other:
        for method, path in [
            ("GET", f"/api/scan/{task_id}"),
            ("DELETE", f"/api/scan/{task_id}"),
            ("GET", f"/api/scan/{task_id}/events"),
        ]:
            answer = other.request(method, path)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "not_found"
        listed = other.get("/api/scans", params={"limit": 200}).json()["items"]
        assert task_id not in {item["task_id"] for item in listed}
    assert wait_final(client, task_id)["state"] == "SUCCESS"
    mine = client.get("/api/scans", params={"limit": 200}).json()["items"]
    assert task_id in {item["task_id"] for item in mine}

    # The finished scan's result and diff are the owner's alone, in every format.
    with httpx.Client(base_url=api, headers=auth(other_api_key), timeout=10) as other:
        own_task = submit(other, ports="1-3").json()["task_id"]
        assert wait_final(other, own_task)["state"] == "SUCCESS"
        for path in [
            f"/api/scan/{task_id}/result",
            f"/api/scan/{task_id}/result?format=csv",
            f"/api/scan/{task_id}/result?format=nmap-xml",
            f"/api/scan/{task_id}/diff",
            f"/api/scan/{task_id}/diff?against={own_task}",
            # Its own scan compared against another key's: the other one is not found.
            f"/api/scan/{own_task}/diff?against={task_id}",
        ]:
            answer = other.get(path)
            assert answer.status_code == 404, (path, answer.text)
            assert answer.json()["error"]["code"] == "not_found"
        assert other.get(f"/api/scan/{own_task}/result").status_code == 200
    assert client.get(f"/api/scan/{task_id}/result").status_code == 200
    assert client.get(f"/api/scan/{task_id}/diff?against={own_task}").status_code == 404


# --- limits ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(settings: Settings, run_dir: Path, database: str) -> Iterator[tuple[Settings, str]]:
    """A gateway with tight limits and no worker on its queue: its scans stay queued."""
    import secrets

    keys = tuple(secrets.token_urlsafe(24) for _ in range(4))
    with own_stack(
        settings,
        run_dir,
        "limited",
        api_keys=keys,
        rate_limit_per_minute=5,
        max_active_scans=2,
        max_ports=100,
    ) as limited_settings:
        yield limited_settings, base_url(limited_settings)


def test_submissions_per_minute_are_limited(limited: tuple[Settings, str]) -> None:
    limited_settings, url = limited
    with httpx.Client(base_url=url, headers=auth(limited_settings.api_keys[0])) as client:
        answers = []
        first_task = None
        # Cancelling each queued scan frees its active slot, so only the rate limit can bite.
        # Twice the limit plus one always reaches it, even across a minute boundary.
        for _ in range(2 * limited_settings.rate_limit_per_minute + 1):
            response = submit(client)
            answers.append(response.status_code)
            if response.status_code == 429:
                break
            first_task = first_task or response.json()["task_id"]
            assert client.delete(f"/api/scan/{response.json()['task_id']}").status_code == 202
        assert answers[-1] == 429, answers
        assert answers.count(202) >= limited_settings.rate_limit_per_minute
        assert response.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(response.headers["retry-after"]) <= 61
        # Reading status is not a submission.
        for _ in range(10):
            assert client.get(f"/api/scan/{first_task}").status_code == 200


def test_active_scans_per_key_are_limited(limited: tuple[Settings, str]) -> None:
    limited_settings, url = limited
    with httpx.Client(base_url=url, headers=auth(limited_settings.api_keys[1])) as client:
        queued = [submit(client) for _ in range(2)]
        assert [r.status_code for r in queued] == [202, 202]
        over = submit(client)
        assert over.status_code == 429
        assert "2 scans already queued or running" in over.json()["error"]["message"]
        assert over.headers["retry-after"]
        assert client.delete(f"/api/scan/{queued[0].json()['task_id']}").status_code == 202
        assert submit(client).status_code == 202


def test_scan_size_is_bounded(limited: tuple[Settings, str]) -> None:
    limited_settings, url = limited
    with httpx.Client(base_url=url, headers=auth(limited_settings.api_keys[2])) as client:
        response = submit(client, ports="1-1000")
        assert response.status_code == 422
        assert response.json()["error"] == {
            "code": "validation_error",
            "message": "1000 ports requested; the bound is 100",
            "field": "ports",
        }
        response = submit(client, target="127.0.0.0/23")
        assert response.status_code == 422
        assert "the bound is 256" in response.json()["error"]["message"]


def test_cancelled_queued_scan_never_starts_even_on_a_later_worker(
    limited: tuple[Settings, str], run_dir: Path, store: ScanStore
) -> None:
    limited_settings, url = limited
    with httpx.Client(base_url=url, headers=auth(limited_settings.api_keys[3])) as client:
        task_id = submit(client, ports="1-10").json()["task_id"]
        cancelled = client.delete(f"/api/scan/{task_id}")
        assert cancelled.status_code == 202
        assert cancelled.json()["state"] == "REVOKED"
        assert client.get(f"/api/scan/{task_id}").json()["state"] == "REVOKED"
        assert client.delete(f"/api/scan/{task_id}").status_code == 202

        # A worker that starts only now receives the message and must not run it.
        worker = start_worker(limited_settings, run_dir / "worker-limited.log", concurrency=1)
        try:
            import asyncio

            deadline = time.monotonic() + 30
            row = None
            while time.monotonic() < deadline:
                row = asyncio.run(_row(limited_settings, UUID(task_id)))
                if row["attempts"] >= 1 and asyncio.run(_queue_depth(limited_settings)) == 0:
                    break
                time.sleep(0.1)
        finally:
            worker.stop()
        assert row is not None
        assert row["attempts"] >= 1, worker.output()[-3000:]
        assert row["state"] == "revoked"
        assert row["started_at"] is None
        assert row["result"] is None
        assert client.get(f"/api/scan/{task_id}").json()["state"] == "REVOKED"


def test_cancel_between_deliveries_sends_no_probe(
    limited: tuple[Settings, str], run_dir: Path
) -> None:
    """A scan whose worker was lost reads 'running' while its message waits for the next
    delivery; a cancel then is answered 'Cancelling', and that delivery must not probe."""
    limited_settings, url = limited
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        httpx.Client(base_url=url, headers=auth(limited_settings.api_keys[3])) as client,
    ):
        server.setblocking(False)
        port = server.getsockname()[1]
        task_id = submit(client, ports=str(port)).json()["task_id"]
        asyncio.run(_as_if_its_worker_was_lost(limited_settings, UUID(task_id)))
        cancelling = client.delete(f"/api/scan/{task_id}")
        assert cancelling.status_code == 202, cancelling.text
        assert cancelling.json()["status"] == "Cancelling"

        worker = start_worker(limited_settings, run_dir / "worker-limited-2.log", concurrency=1)
        try:
            deadline = time.monotonic() + 30
            row = asyncio.run(_row(limited_settings, UUID(task_id)))
            while row["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.1)
                row = asyncio.run(_row(limited_settings, UUID(task_id)))
        finally:
            worker.stop()
        assert row["state"] == "revoked", worker.output()[-3000:]
        assert row["attempts"] == 2
        with pytest.raises(BlockingIOError):
            server.accept()  # nothing ever connected to the scanned port
        assert client.get(f"/api/scan/{task_id}").json()["state"] == "REVOKED"


async def _as_if_its_worker_was_lost(settings: Settings, task_id: UUID) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "UPDATE scans SET state = 'running', attempts = 1, started_at = now()"
            " WHERE task_id = $1",
            task_id,
        )
    finally:
        await conn.close()


async def _row(settings: Settings, task_id: UUID) -> asyncpg.Record:
    conn = await asyncpg.connect(settings.database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM scans WHERE task_id = $1", task_id)
        assert row is not None
        return row
    finally:
        await conn.close()


async def _queue_depth(settings: Settings) -> int:
    connection = await aio_pika.connect(settings.broker_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.scan_queue, passive=True)
        count = queue.declaration_result.message_count
        return int(count or 0)


# --- target policy ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workerless(settings: Settings, run_dir: Path, database: str) -> Iterator[Settings]:
    """The run's gateway settings with a queue no worker reads: a denied target that got
    through would wait there, never be probed."""
    with own_stack(settings, run_dir, "policy") as own:
        yield own


@pytest.mark.parametrize(
    "target",
    ["127.0.0.66", "169.254.169.254", "fe80::1", "224.0.0.1", "0.0.0.0", "::ffff:127.0.0.66"],
)
def test_denied_targets_are_403(workerless: Settings, api_key: str, target: str) -> None:
    with httpx.Client(base_url=base_url(workerless), timeout=10, headers=auth(api_key)) as c:
        response = submit(c, target=target)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "target_denied"
    assert response.json()["error"]["field"] == "target"
    assert asyncio.run(_queue_depth(workerless)) == 0


async def test_worker_refuses_a_denied_target_it_is_sent_directly(
    settings: Settings, store: ScanStore, worker: Process, aclient: httpx.AsyncClient
) -> None:
    """A message that bypassed the gateway's check is still refused by the worker."""
    scan_id, task_id = uuid4(), uuid4()
    config = ScanConfig()
    owner = await KeyStore(store.pool).lookup(settings.api_keys[0])
    await store.insert(
        scan_id=scan_id,
        task_id=task_id,
        target="127.0.0.66",
        ports="80",
        config=config,
        priority="normal",
        owner=owner,
    )
    payload = ScanTaskPayload(
        scan_id=scan_id, target="127.0.0.66", ports="80", config=config, priority="normal"
    )
    publisher = AmqpPublisher(settings)
    try:
        await publisher.publish(
            build_scan_message(task_id, payload, port_count=1, limits=LimitPolicy.of(settings))
        )
    finally:
        await publisher.close()
    deadline = time.monotonic() + 30
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = (await aclient.get(f"/api/scan/{task_id}")).json()
        if body["state"] in FINAL:
            break
    assert body["state"] == "FAILURE", body
    assert "127.0.0.66 is denied by the target policy" in body["error"]
    row = await store.get(scan_id)
    assert row is not None
    assert row.state == "failed"
    assert row.started_at is not None


def hosts_wrapper(run_dir: Path, name: str, address: str) -> list[str]:
    """Run a command in its own mount namespace where /etc/hosts maps rebind.test."""
    hosts = run_dir / f"hosts-{name}"
    hosts.write_text(
        Path("/etc/hosts").read_text() + f"\n{address} rebind.test\n", encoding="utf-8"
    )
    script = 'mount --bind "$0" /etc/hosts && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(hosts)]


@pytest.fixture(scope="module")
def rebinding_stack(settings: Settings, run_dir: Path, database: str) -> Iterator[str]:
    """The gateway resolves rebind.test to an allowed address, the worker to a denied one."""
    assert os.geteuid() == 0, "the DNS rebinding test needs root for a private mount namespace"
    with own_stack(
        settings,
        run_dir,
        "rebind",
        workers=1,
        wrap_api=hosts_wrapper(run_dir, "api", "127.0.0.1"),
        wrap_worker=hosts_wrapper(run_dir, "worker", "127.0.0.66"),
    ) as rebind:
        yield base_url(rebind)


def test_dns_rebinding_is_refused_by_the_worker(rebinding_stack: str, api_key: str) -> None:
    with httpx.Client(base_url=rebinding_stack, headers=auth(api_key), timeout=10) as client:
        response = submit(client, target="rebind.test", ports="80")
        assert response.status_code == 202, response.text
        final = wait_final(client, response.json()["task_id"])
    assert final["state"] == "FAILURE"
    assert "127.0.0.66 is denied by the target policy" in final["error"]


# --- listing ---------------------------------------------------------------------------------


@pytest.fixture
async def fresh_key(store: ScanStore) -> AsyncIterator[str]:
    keys = KeyStore(store.pool)
    key = await keys.create(f"list-{uuid4().hex[:8]}")
    yield key
    await store.pool.execute(
        "UPDATE api_keys SET revoked_at = now() WHERE key_hash = $1", hash_key(key)
    )


def test_listing_is_newest_first_with_cursor_and_filters(
    api: str, fresh_key: str, worker: Process
) -> None:
    with httpx.Client(base_url=api, headers=auth(fresh_key), timeout=10) as client:
        tasks = []
        for target in ["127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.2", "127.0.0.1"]:
            response = submit(client, target=target, ports="1-2")
            assert response.status_code == 202
            tasks.append((target, response.json()["task_id"]))
        for _, task_id in tasks:
            wait_final(client, task_id)

        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 2}
            if cursor:
                params["cursor"] = cursor
            page = client.get("/api/scans", params=params).json()
            pages += 1
            seen += [item["task_id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == [task_id for _, task_id in reversed(tasks)]
        assert pages == 3

        twos = client.get("/api/scans", params={"target": "127.0.0.2"}).json()["items"]
        assert [i["task_id"] for i in twos] == [
            t for tgt, t in reversed(tasks) if tgt == "127.0.0.2"
        ]
        done = client.get("/api/scans", params={"state": "completed"}).json()["items"]
        assert len(done) == 5
        assert all(item["state"] == "completed" for item in done)
        assert client.get("/api/scans", params={"state": "queued"}).json()["items"] == []
        for bad in (
            {"limit": 0},
            {"limit": "x"},
            {"cursor": "garbage!"},
            {"state": "odd"},
            {"sort": "asc"},
        ):
            answer = client.get("/api/scans", params=bad)
            assert answer.status_code == 422, bad
            assert answer.json()["error"]["field"] == next(iter(bad))


# --- cancel a running scan, events, idempotency ----------------------------------------------


def test_running_scan_stops_on_cancel_and_keeps_its_partial_result(
    client: httpx.Client, worker: Process, listeners: list[int], silent_port: int
) -> None:
    ports = ",".join(map(str, [*listeners, silent_port]))
    task_id = submit(client, ports=ports, config={"timeout": 20.0}).json()["task_id"]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body = client.get(f"/api/scan/{task_id}").json()
        if body["state"] == "PROGRESS" and body.get("open_ports_found"):
            break
        time.sleep(0.05)
    else:
        pytest.fail(f"scan never reported its open ports: {body}")
    cancelled = client.delete(f"/api/scan/{task_id}")
    assert cancelled.status_code == 202
    final = wait_final(client, task_id, timeout=15)
    assert final["state"] == "REVOKED"
    # The silent port would have held the scan for 20 s: it was never settled.
    assert final["result"]["total_ports_scanned"] < len(listeners) + 1
    assert final["result"]["status"] == "revoked"
    assert [p["port"] for p in final["result"]["open_ports"]] == listeners
    assert client.delete(f"/api/scan/{task_id}").status_code == 202


def read_events(
    client: httpx.Client, task_id: str, last_id: str | None = None
) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_id} if last_id else {}
    events: list[dict[str, Any]] = []
    with client.stream("GET", f"/api/scan/{task_id}/events", headers=headers, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in r.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(": ")
            current[field] = value
    return events


def test_events_stream_progress_ports_and_end_and_resume(
    client: httpx.Client, worker: Process, listeners: list[int], silent_port: int
) -> None:
    import json

    ports = ",".join(map(str, [*listeners, silent_port]))
    task_id = submit(client, ports=ports, config={"timeout": 1.5}).json()["task_id"]
    events = read_events(client, task_id)
    kinds = [e["event"] for e in events]
    assert kinds[-1] == "end"
    assert "progress" in kinds
    end = json.loads(events[-1]["data"])
    assert end["state"] == "SUCCESS"
    assert [p["port"] for p in end["result"]["open_ports"]] == listeners
    found = sorted(json.loads(e["data"])["port"] for e in events if e["event"] == "port")
    assert found == listeners
    ids = [e["id"] for e in events]
    assert len(set(ids[:-1])) == len(ids) - 1

    # A client that lost the connection after the second event resumes from it.
    resumed = read_events(client, task_id, last_id=events[1]["id"])
    assert [e["id"] for e in resumed[:-1]] == ids[2:-1]
    assert resumed[-1]["event"] == "end"
    bad = client.get(f"/api/scan/{task_id}/events", headers={"Last-Event-ID": "nope"})
    assert bad.status_code == 422


async def test_idempotency_key_returns_the_same_scan(
    aclient: httpx.AsyncClient, store: ScanStore
) -> None:
    key = f"idem-{uuid4()}"
    body = {"target": "127.0.0.1", "ports": "1-5"}
    first = await aclient.post("/api/scan", json=body, headers={"Idempotency-Key": key})
    again = await aclient.post("/api/scan", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json()
    assert again.headers["idempotent-replayed"] == "true"
    other = await aclient.post(
        "/api/scan", json={**body, "ports": "1-6"}, headers={"Idempotency-Key": key}
    )
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "conflict"
    rows = await store.pool.fetchval("SELECT count(*) FROM scans WHERE idempotency_key = $1", key)
    assert rows == 1
