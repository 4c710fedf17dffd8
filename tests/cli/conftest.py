"""A stand-in for the API server: a real Starlette app under uvicorn on 127.0.0.1 that speaks the
client's contract (scan, status, list, cancel, result exports, diff, SSE events) with canned
scans, so the CLI can be run for real against HTTP before every route exists in api_service."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import orjson
import pytest
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from bench._stack import free_port
from shared.diff import diff_results
from shared.exports import EXPORT_FORMATS, MEDIA_TYPES, render
from shared.ports import order_by_tier, parse_port_spec
from shared.schemas import PortResult, ScanRequest, ScanResult

API_KEY = "test-key"
T0 = datetime(2026, 11, 25, 14, 0, tzinfo=UTC)


@dataclass
class Task:
    task_id: UUID
    scan_id: UUID
    target: str
    ports: str
    created_at: datetime
    state: str = "PENDING"
    result: ScanResult | None = None
    error: str | None = None
    polls: int = 0

    def status(self) -> dict[str, Any]:
        total = len(parse_port_spec(self.ports))
        body: dict[str, Any] = {
            "task_id": str(self.task_id),
            "scan_id": str(self.scan_id),
            "state": self.state,
            "status": {
                "PENDING": "Queued",
                "PROGRESS": "Scanning critical priority ports",
                "SUCCESS": "Scan completed",
                "FAILURE": "Scan failed",
                "REVOKED": "Scan cancelled",
            }[self.state],
            "progress": {"PENDING": 0, "PROGRESS": 50}.get(self.state, 100),
            "created_at": self.created_at.isoformat(),
            "error": self.error,
            "result": None if self.result is None else self.result.model_dump(mode="json"),
        }
        if self.state == "PROGRESS":
            body |= {
                "tier": "critical",
                "ports_scanned": total // 2,
                "total_ports": total,
                "open_ports_found": [p.port for p in self._planned().open_ports][:1],
            }
        return body

    def summary(self) -> dict[str, Any]:
        return {
            "task_id": str(self.task_id),
            "scan_id": str(self.scan_id),
            "target": self.target,
            "ports": self.ports,
            "state": self.state,
            "created_at": self.created_at.isoformat(),
        }

    def finish(self) -> None:
        self.state, self.result = "SUCCESS", self._planned()

    def _planned(self) -> ScanResult:
        return self.result or canned_result(self.scan_id, self.target, self.ports, self.created_at)


def canned_result(
    scan_id: UUID, target: str, ports: str, at: datetime, *, nginx: str = "1.25.3"
) -> ScanResult:
    """Open: 22 (OpenSSH) and 80 (nginx) when in the spec, and 8080 when in the spec."""
    wanted = parse_port_spec(ports)
    known = {
        22: PortResult(
            port=22,
            state="open",
            address="127.0.0.1",
            reason="syn-ack",
            service="ssh",
            product="OpenSSH",
            version="9.2p1",
            banner="SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3",
        ),
        80: PortResult(
            port=80,
            state="open",
            address="127.0.0.1",
            reason="syn-ack",
            service="http",
            product="nginx",
            version=nginx,
        ),
        8080: PortResult(
            port=8080, state="open", address="127.0.0.1", reason="syn-ack", service="http-proxy"
        ),
    }
    open_ports = [known[p] for p in wanted if p in known]
    return ScanResult(
        scan_id=scan_id,
        target=target,
        addresses=["127.0.0.1"],
        ports=ports,
        total_ports_scanned=len(wanted),
        open_ports=open_ports,
        closed_ports=len(wanted) - len(open_ports),
        started_at=at,
        finished_at=at + timedelta(seconds=1.25),
        duration_seconds=1.25,
    )


@dataclass
class FakeApi:
    """The server's state; tests change it directly (the server runs in this process)."""

    tasks: dict[str, Task] = field(default_factory=dict)
    sse: bool = True
    cut_stream: bool = False
    fail_with: int | None = None
    outcome: str = "SUCCESS"
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    bodies: list[Any] = field(default_factory=list)
    last_event_ids: list[str | None] = field(default_factory=list)
    done: Task = field(init=False)
    previous: Task = field(init=False)

    def __post_init__(self) -> None:
        self.previous = self.add("127.0.0.1", "20-25,80,443", T0, nginx="1.24.0")
        self.done = self.add("127.0.0.1", "20-25,80,8080", T0 + timedelta(days=1))

    def add(self, target: str, ports: str, at: datetime, *, nginx: str = "1.25.3") -> Task:
        task = Task(uuid4(), uuid4(), target, ports, at)
        task.state = "SUCCESS"
        task.result = canned_result(task.scan_id, target, ports, at, nginx=nginx)
        self.tasks[str(task.task_id)] = task
        return task


def error(status: int, code: str, message: str, **headers: str) -> Response:
    body = {"error": {"code": code, "message": message, "field": None}}
    return Response(orjson.dumps(body), status, headers, media_type="application/json")


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


def build_app(state: FakeApi) -> Starlette:
    def find(request: Request) -> Task | None:
        return state.tasks.get(str(request.path_params["task_id"]))

    async def create(request: Request) -> Response:
        state.bodies.append(orjson.loads(await request.body()))
        try:
            scan = ScanRequest.model_validate_json(await request.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"]))
            return error(422, "validation_error", f"{where}: {first['msg']}")
        task = Task(uuid4(), uuid4(), scan.target, scan.ports, datetime.now(UTC))
        state.tasks[str(task.task_id)] = task
        body = {
            "task_id": str(task.task_id),
            "scan_id": str(task.scan_id),
            "status": "queued",
            "message": f"Scan of {scan.target} ({len(parse_port_spec(scan.ports))} ports) "
            f"queued with {scan.priority} priority",
        }
        return json_response(body, 202)

    async def status(request: Request) -> Response:
        task = find(request)
        if task is None:
            return error(404, "not_found", f"no scan with task id {request.path_params['task_id']}")
        if task.state in ("PENDING", "PROGRESS"):  # each poll moves the scan on
            task.polls += 1
            task.state = "PROGRESS" if task.polls < 3 else state.outcome
            if task.state == "SUCCESS":
                task.finish()
            elif task.state == "FAILURE":
                task.error = "OSError: too many open files"
        return json_response(task.status())

    async def cancel(request: Request) -> Response:
        task = find(request)
        if task is None:
            return error(404, "not_found", "no such scan")
        if task.state in ("PENDING", "PROGRESS"):
            task.state = "REVOKED"
        return json_response(task.status(), 202)

    async def listing(request: Request) -> Response:
        items = sorted(state.tasks.values(), key=lambda t: t.created_at, reverse=True)
        if want := request.query_params.get("state"):
            items = [t for t in items if t.state == want]
        if target := request.query_params.get("target"):
            items = [t for t in items if t.target == target]
        start = int(request.query_params.get("cursor") or 0)
        limit = int(request.query_params.get("limit") or 20)
        page = items[start : start + limit]
        more = start + limit < len(items)
        return json_response(
            {
                "items": [t.summary() for t in page],
                "next_cursor": str(start + limit) if more else None,
            }
        )

    async def result(request: Request) -> Response:
        task = find(request)
        if task is None:
            return error(404, "not_found", "no such scan")
        fmt = request.query_params.get("format", "json")
        if fmt not in EXPORT_FORMATS:
            return error(422, "validation_error", f"format: {fmt!r} is not one of {EXPORT_FORMATS}")
        if task.result is None:
            return error(409, "not_finished", f"scan is {task.state}")
        body = render(task.result, fmt)
        return Response(body, media_type=MEDIA_TYPES[fmt])

    async def diff(request: Request) -> Response:
        task = find(request)
        if task is None or task.result is None:
            return error(404, "not_found", "no such finished scan")
        against = request.query_params.get("against", "previous")
        if against == "previous":
            earlier = [
                t
                for t in state.tasks.values()
                if t.target == task.target and t.result and t.created_at < task.created_at
            ]
            other = max(earlier, key=lambda t: t.created_at, default=None)
        else:
            other = state.tasks.get(against)
        if other is None or other.result is None:
            return error(404, "not_found", "no earlier scan to compare with")
        found = diff_results(
            other.result, task.result, old_task_id=other.task_id, new_task_id=task.task_id
        )
        return Response(found.model_dump_json(), media_type="application/json")

    async def events(request: Request) -> Response:
        task = find(request)
        if not state.sse or task is None:
            return error(404, "not_found", "no such route" if not state.sse else "no such scan")
        last = request.headers.get("last-event-id")
        state.last_event_ids.append(last)
        stream = event_stream(task, state, int(last) if last else 0)
        return StreamingResponse(stream, media_type="text/event-stream")

    async def auth(request: Request, call_next: RequestResponseEndpoint) -> Response:
        state.requests.append((request.method, request.url.path, dict(request.query_params)))
        if request.headers.get("authorization") != f"Bearer {API_KEY}":
            return error(401, "unauthorized", "missing or invalid API key")
        if state.fail_with == 429:
            return error(429, "rate_limited", "too many requests", **{"Retry-After": "7"})
        if state.fail_with is not None:
            return error(503, "unavailable", "database unavailable", **{"Retry-After": "1"})
        return await call_next(request)

    return Starlette(
        routes=[
            Route("/api/scan", create, methods=["POST"]),
            Route("/api/scans", listing),
            Route("/api/scan/{task_id}", status),
            Route("/api/scan/{task_id}", cancel, methods=["DELETE"]),
            Route("/api/scan/{task_id}/result", result),
            Route("/api/scan/{task_id}/diff", diff),
            Route("/api/scan/{task_id}/events", events),
        ],
        middleware=[Middleware(BaseHTTPMiddleware, dispatch=auth)],
    )


async def event_stream(task: Task, state: FakeApi, after: int) -> AsyncIterator[bytes]:
    """Progress per tier, a ``port`` event per open port, then ``end``, as the API sends them;
    a reconnect with Last-Event-ID gets only the events after it. With ``cut_stream`` the first
    connection ends after one progress event, as when a proxy cuts it."""
    planned = canned_result(task.scan_id, task.target, task.ports, task.created_at)
    total = len(parse_port_spec(task.ports))
    n, done, found = 0, 0, list[int]()

    def frame(event: str, data: Any) -> bytes:
        nonlocal n
        n += 1
        if n <= after:
            return b""
        return f"id: {n}\nevent: {event}\ndata: {orjson.dumps(data).decode()}\n\n".encode()

    yield b": stream opened\n\n"
    task.state = "PROGRESS"
    for tier, ports in order_by_tier(parse_port_spec(task.ports)):
        done += len(ports)
        for port in planned.open_ports:
            if port.port in ports:
                found.append(port.port)
                yield frame("port", {"port": port.port, "address": port.address, "state": "open"})
        progress = {
            "status": f"Scanning {tier} priority ports",
            "progress": done * 100 // total,
            "tier": tier,
            "ports_scanned": done,
            "total_ports": total,
            "open_ports": sorted(found),
        }
        yield frame("progress", progress)
        if state.cut_stream and not after:
            return
        await asyncio.sleep(0.01)
    task.state = state.outcome
    if task.state == "SUCCESS":
        task.finish()
    else:
        task.error = "OSError: too many open files"
    yield frame("end", task.status())


@dataclass
class Server:
    url: str
    state: FakeApi


@pytest.fixture(scope="session")
def _server() -> Iterator[tuple[str, list[FakeApi]]]:
    holder = [FakeApi()]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await build_app(holder[0])(scope, receive, send)

    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        loop="asyncio",
        http="h11",
        ws="none",
        lifespan="off",
        log_level="warning",
        access_log=False,
        # A stream a test walked away from must not hold the stop at the end of the session.
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="fake-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive(), "the stand-in API did not start"
        assert time.monotonic() < deadline, "the stand-in API did not start within 10 s"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", holder
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        assert not thread.is_alive(), "the stand-in API did not stop"


@pytest.fixture
def api(_server: tuple[str, list[FakeApi]]) -> Server:
    """The running stand-in API with fresh state for this test."""
    url, holder = _server
    holder[0] = FakeApi()
    return Server(url, holder[0])


@pytest.fixture(autouse=True)
def _client_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    """No connection settings leak in from the developer's environment or config file."""
    for name in ("CYBERSEC_API_URL", "CYBERSEC_API_KEY", "XDG_CONFIG_HOME", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CYBERSEC_CONFIG", str(tmp_path / "absent.toml"))
    monkeypatch.setenv("COLUMNS", "200")
