"""Issue 16: each attack from a read of the code, played against the real stack.

One gateway with tight bounds and no worker on its queue (its scans stay queued, nothing is
probed), one key per attack so the limits of one never blur another's. Every target is on
loopback or is refused before anything could reach it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from uuid import UUID, uuid4

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from api_service.errors import ApiError
from api_service.limits import Limiter
from shared.migrate import drop_database, migrate
from shared.settings import Settings
from tests.conftest import auth, base_url, own_stack

pytestmark = pytest.mark.e2e

RATE = 5
STREAMS_PER_KEY = 4
STREAMS = 12
WINDOW = 2  # seconds over which the stream test counts the gateway's PostgreSQL queries
KEYS = 13


@pytest.fixture(scope="module")
def abuse(settings: Settings, run_dir: Path, database: str) -> Iterator[Settings]:
    # A database of its own: the stream test counts this gateway's transactions, to which the
    # rest of the run (the workers' reapers, other stacks) would otherwise add its own.
    own_database = f"{database}_abuse"
    asyncio.run(migrate(own_database))
    try:
        yield from _abuse_stack(settings, run_dir, own_database)
    finally:
        asyncio.run(drop_database(own_database))


def _abuse_stack(settings: Settings, run_dir: Path, database_url: str) -> Iterator[Settings]:
    with own_stack(
        settings,
        run_dir,
        "abuse",
        database_url=database_url,
        api_keys=tuple(secrets.token_urlsafe(24) for _ in range(KEYS)),
        rate_limit_per_minute=RATE,
        max_active_scans=50,
        max_event_streams_per_key=STREAMS_PER_KEY,
        max_event_streams=STREAMS,
        # Every host name is "allowed"; only 127.0.0.2 is lifted out of the default deny.
        target_allow=("*", "127.0.0.2/32"),
    ) as own:
        yield own


def client_for(own: Settings, key_index: int) -> httpx.Client:
    return httpx.Client(base_url=base_url(own), headers=auth(own.api_keys[key_index]), timeout=20)


def submit_until_limited(client: httpx.Client) -> list[int]:
    """Valid submissions (cancelled at once, so only the rate can bite) until the first 429."""
    answers: list[int] = []
    for _ in range(2 * RATE + 1):
        response = client.post("/api/scan", json={"target": "127.0.0.2", "ports": "1"})
        answers.append(response.status_code)
        if response.status_code != 202:
            break
        client.delete(f"/api/scan/{response.json()['task_id']}")
    return answers


async def open_streams(url: str, key: str, task_id: str, count: int) -> list[int]:
    """Open ``count`` event streams at once and hold them; the status each got."""
    limits = httpx.Limits(max_connections=count + 10)
    async with httpx.AsyncClient(
        base_url=url, headers=auth(key), timeout=30, limits=limits
    ) as client:
        return await _hold(client, task_id, count)


async def _hold(client: httpx.AsyncClient, task_id: str, count: int) -> list[int]:
    opened = asyncio.Event()
    statuses: list[int] = []

    async def one() -> None:
        async with client.stream("GET", f"/api/scan/{task_id}/events") as response:
            statuses.append(response.status_code)
            if len(statuses) == count:
                opened.set()
            if response.status_code == 200:
                await opened.wait()
            else:
                body = await response.aread()
                assert b'"code":"rate_limited"' in body, body

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), timeout=60)
    return statuses


def queued_scan(client: httpx.Client) -> str:
    response = client.post("/api/scan", json={"target": "127.0.0.2", "ports": "1"})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


# --- 1. event streams cannot switch the limits off --------------------------------------------


def test_200_streams_on_one_key_leave_the_limits_standing(abuse: Settings) -> None:
    with client_for(abuse, 0) as client:
        task_id = queued_scan(client)
        statuses = asyncio.run(open_streams(base_url(abuse), abuse.api_keys[0], task_id, 200))
    assert statuses.count(200) == STREAMS_PER_KEY, statuses
    assert statuses.count(429) == 200 - STREAMS_PER_KEY
    # Another key is still rate-limited, and the streams' slots came back when they closed.
    with client_for(abuse, 1) as other:
        answers = submit_until_limited(other)
    assert answers[-1] == 429, answers
    assert answers.count(202) == RATE, answers
    # Closed streams give their slots back (the gateway sees each disconnect shortly after).
    deadline = time.monotonic() + 15
    again: list[int] = []
    while time.monotonic() < deadline:
        again = asyncio.run(
            open_streams(base_url(abuse), abuse.api_keys[0], task_id, STREAMS_PER_KEY)
        )
        if again == [200] * STREAMS_PER_KEY:
            break
        time.sleep(0.2)
    assert again == [200] * STREAMS_PER_KEY


def test_the_process_bounds_streams_across_keys_and_polls_postgres_once(
    abuse: Settings,
) -> None:
    async def scenario() -> tuple[list[int], int]:
        url = base_url(abuse)
        held: list[asyncio.Task[list[int]]] = []
        stop = asyncio.Event()
        answered: list[int] = []
        all_answered = asyncio.Event()
        clients = []
        for index in (2, 3, 4):
            with client_for(abuse, index) as sync:
                task_id = queued_scan(sync)
            client = httpx.AsyncClient(
                base_url=url,
                headers=auth(abuse.api_keys[index]),
                timeout=30,
                limits=httpx.Limits(max_connections=20),
            )
            clients.append(client)
            held += [
                asyncio.create_task(_stream_until(client, task_id, stop, answered, all_answered))
                for _ in range(STREAMS_PER_KEY)
            ]
        try:
            await asyncio.wait_for(all_answered.wait(), timeout=30)
            with client_for(abuse, 5) as fourth:
                over = fourth.get(f"/api/scan/{queued_scan(fourth)}/events")
            # With 12 streams open, PostgreSQL sees one watcher, not a query per stream a second.
            during = await _queries_over(abuse, WINDOW)
        finally:
            stop.set()
            await asyncio.gather(*held, return_exceptions=True)
            for client in clients:
                await client.aclose()
        assert over.status_code == 429, over.text
        assert over.json()["error"]["message"] == "too many event streams open"
        return [status for task in held for status in task.result()], during

    statuses, queries = asyncio.run(scenario())
    assert statuses == [200] * STREAMS
    # A poll per stream a second would start STREAMS * WINDOW queries; the one watcher starts
    # WINDOW. Half of the per-stream figure leaves room for the gateway's other work.
    assert queries < STREAMS * WINDOW / 2, queries


async def _stream_until(
    client: httpx.AsyncClient,
    task_id: str,
    stop: asyncio.Event,
    answered: list[int],
    all_answered: asyncio.Event,
) -> list[int]:
    async with client.stream("GET", f"/api/scan/{task_id}/events") as response:
        answered.append(response.status_code)
        if len(answered) == STREAMS:
            all_answered.set()
        await stop.wait()
        return [response.status_code]


async def _queries_over(own: Settings, seconds: float) -> int:
    """Queries the gateway's connections started over ``seconds``: each backend's last query
    start, sampled every 20 ms from ``pg_stat_activity``, which shows it at once (the
    cumulative statistics views may come seconds late: PostgreSQL flushes an idle backend's
    counts up to 10 s after the fact). A backend starting two queries within one sample is
    counted once: this undercounts a per-stream poll, never the watcher."""
    name = own.database_url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(own.database_url)
    try:
        started = await conn.fetchval("SELECT now()")
        seen: set[tuple[int, object]] = set()
        deadline = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < deadline:
            rows = await conn.fetch(
                "SELECT pid, query_start FROM pg_stat_activity WHERE datname = $1"
                " AND pid <> pg_backend_pid() AND query_start > $2",
                name,
                started,
            )
            seen |= {(row["pid"], row["query_start"]) for row in rows}
            await asyncio.sleep(0.02)
        return len(seen)
    finally:
        await conn.close()


async def test_an_exhausted_redis_pool_is_not_read_as_redis_down(settings: Settings) -> None:
    """Before: every Redis error, pool exhaustion included, admitted the submission."""
    pool = aioredis.ConnectionPool.from_url(settings.redis_url, max_connections=1)
    client = aioredis.Redis(connection_pool=pool)
    prefix = f"{settings.redis_prefix}abuse-{uuid4().hex[:6]}:"
    limiter = Limiter(client, prefix, per_minute=RATE, max_active=5)
    held = await pool.get_connection()  # type: ignore[no-untyped-call]
    try:
        with pytest.raises(ApiError) as refused:
            await limiter.admit(uuid4(), uuid4(), uuid4(), 60)
        assert refused.value.status == 503
        with pytest.raises(ApiError) as refused:
            await limiter.charge(uuid4())
        assert refused.value.status == 503
    finally:
        await pool.release(held)
        await client.aclose()
        await pool.disconnect()


# --- 5. a port spec is cheap to refuse, and a refusal costs the key its rate ------------------


def test_the_largest_port_spec_is_merged_not_expanded(abuse: Settings) -> None:
    spec = ",".join(["1-65535"] * 511)
    with client_for(abuse, 6) as client:
        response = client.post("/api/scan", json={"target": "127.0.0.2", "ports": spec})
        assert response.status_code == 202, response.text
        assert "(65535 ports)" in response.json()["message"]
        status = client.get(f"/api/scan/{response.json()['task_id']}").json()
        assert client.delete(f"/api/scan/{status['task_id']}").status_code == 202


def test_refused_submissions_count_against_the_rate(abuse: Settings) -> None:
    bad_spec = ",".join(["1-65535"] * 511) + ",0"
    with client_for(abuse, 7) as client:
        refusals = [
            client.post("/api/scan", json={"target": "127.0.0.2", "ports": bad_spec}),
            client.post("/api/scan", json={"target": "127.0.0.2", "ports": "99999"}),
            client.post("/api/scan", json={"target": "127.0.0.2", "nope": 1}),
            # Host names cost a lookup: refused by the policy, still counted.
            client.post("/api/scan", json={"target": "0x7f000001", "ports": "1"}),
            client.post("/api/scan", json={"target": "localhost", "ports": "1"}),
        ]
        assert [r.status_code for r in refusals] == [422, 422, 422, 403, 403]
        over = client.post("/api/scan", json={"target": "127.0.0.2", "ports": "1"})
    assert over.status_code == 429, over.text
    assert over.json()["error"]["code"] == "rate_limited"
    assert over.headers["retry-after"]


# --- 3. an allowed name never lifts the default deny ------------------------------------------


@pytest.mark.parametrize(
    ("key", "target"), [(8, "localhost"), (9, "0x7f000001"), (10, "0xa9fea9fe")]
)
def test_a_star_allow_does_not_open_loopback_or_metadata(
    abuse: Settings, key: int, target: str
) -> None:
    with client_for(abuse, key) as client:
        response = client.post("/api/scan", json={"target": target, "ports": "1"})
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["code"] == "target_denied"
    assert error["field"] == "target"
    # Neither the address it resolved to nor the rule that matched is told.
    for leak in ("127.0.0.1", "169.254", "loopback", "link-local", "default"):
        assert leak not in error["message"]


# --- 4. the list reads a summary column, never the results -----------------------------------


async def test_the_list_counts_open_ports_without_loading_results(abuse: Settings) -> None:
    """Before: a page of 200 loaded and validated 200 full results to count their ports; a
    result the schema no longer reads broke the whole list."""
    with client_for(abuse, 11) as client:
        task_id = queued_scan(client)
    conn = await asyncpg.connect(abuse.database_url)
    try:
        await conn.execute(
            "UPDATE scans SET state = 'completed', finished_at = now(),"
            " result = $2::jsonb WHERE task_id = $1",
            UUID(task_id),
            '{"open_ports": [{"port": 22}, {"port": 80}], "open_ports_omitted": 5,'
            ' "not_in_the_schema": true}',
        )
    finally:
        await conn.close()
    async with httpx.AsyncClient(
        base_url=base_url(abuse), headers=auth(abuse.api_keys[11]), timeout=20
    ) as client:
        listed = await client.get("/api/scans", params={"limit": 200})
    assert listed.status_code == 200, listed.text
    [item] = [i for i in listed.json()["items"] if i["task_id"] == task_id]
    assert item["open_ports"] == 7


# --- low: a key's share of the critical level --------------------------------------------------


def test_a_key_gets_only_its_share_of_the_critical_level(abuse: Settings) -> None:
    """Before, a key could send every scan 'critical' and jump every other key's queue."""
    assert abuse.critical_per_minute == 1
    body = {"target": "127.0.0.2", "ports": "1", "priority": "critical"}
    with client_for(abuse, 12) as client:
        first = client.post("/api/scan", json=body)
        assert first.status_code == 202, first.text
        second = client.post("/api/scan", json=body)
        assert second.status_code == 429, second.text
        assert second.json()["error"]["field"] == "priority"
        assert second.headers["retry-after"]
        lower = client.post("/api/scan", json={**body, "priority": "high"})
        assert lower.status_code == 202, lower.text
        for answer in (first, lower):
            client.delete(f"/api/scan/{answer.json()['task_id']}")
