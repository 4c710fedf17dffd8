"""Both services log one JSON object per line, and a task's lines carry its scan and task ids."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.logging import JsonFormatter, TextFormatter, bind_scan, bound_scan, unbind_scan
from shared.settings import Settings
from tests.conftest import (
    ROOT,
    Process,
    auth,
    base_url,
    delete_queues,
    start_api,
    start_worker,
    variant,
)

FIELDS = {"time", "level", "logger", "message", "service", "pid"}


@dataclass
class Logged:
    api: Process
    worker: Process
    scan_id: str
    task_id: str


def json_lines(process: Process) -> list[dict[str, Any]]:
    """Every complete line of the process's output, each parsed as a JSON object."""
    lines = process.output().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # still being written
    entries = []
    for line in lines:
        entry = json.loads(line)
        assert isinstance(entry, dict), line
        entries.append(entry)
    return entries


def lines_until(process: Process, wanted: str, timeout: float = 15) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        entries = json_lines(process)
        if any(wanted in entry["message"] for entry in entries):
            return entries
        time.sleep(0.1)
    pytest.fail(f"no line with {wanted!r}:\n{process.output()[-3000:]}")


@pytest.fixture(scope="module")
def logged(
    settings: Settings, run_dir: Path, database: str, redis_client: object, api_key: str
) -> Iterator[Logged]:
    """An API and a worker logging JSON, after one scan and one rejected request."""
    stack = variant(settings, "logging", run_dir, log_format="json", metrics_port=0)
    worker = start_worker(stack, run_dir / "worker-logging.log")
    api = start_api(stack, run_dir / "api-logging.log")
    try:
        with (
            socket.create_server(("127.0.0.1", 0)) as server,
            httpx.Client(base_url=base_url(stack), timeout=10, headers=auth(api_key)) as client,
        ):
            port = server.getsockname()[1]
            response = client.post("/api/scan", json={"target": "127.0.0.1", "ports": str(port)})
            assert response.status_code == 202, response.text
            accepted = response.json()
            deadline = time.monotonic() + 30
            while client.get(f"/api/scan/{accepted['task_id']}").json()["state"] != "SUCCESS":
                assert time.monotonic() < deadline, "scan did not finish"
                time.sleep(0.05)
            assert client.post("/api/scan", json={"target": "127.0.0.1", "ports": "x"}).is_error
        yield Logged(api, worker, accepted["scan_id"], accepted["task_id"])
    finally:
        api.stop()
        worker.stop()
        asyncio.run(delete_queues(stack))


def test_api_logs_json_lines(logged: Logged) -> None:
    entries = lines_until(logged.api, '"POST /api/scan HTTP/1.1" 422')
    assert all(set(entry) >= FIELDS for entry in entries)
    assert {entry["service"] for entry in entries} == {"api"}
    assert any(entry["logger"] == "uvicorn.error" for entry in entries), "uvicorn's own lines"
    [submitted] = [e for e in entries if e.get("path") == "/api/scan" and e.get("status") == 202]
    assert submitted["logger"] == "uvicorn.access"
    assert submitted["method"] == "POST"
    assert submitted["level"] == "INFO"
    assert submitted["time"].endswith("Z")


def test_api_lines_about_a_scan_carry_its_ids(logged: Logged) -> None:
    entries = lines_until(logged.api, f"/api/scan/{logged.task_id}")
    assert any(
        entry.get("scan_id") == logged.scan_id and entry.get("task_id") == logged.task_id
        for entry in entries
    )


def test_worker_logs_json_lines_with_the_scan_ids(logged: Logged) -> None:
    entries = lines_until(logged.worker, f"[{logged.task_id}] succeeded")
    assert all(set(entry) >= FIELDS for entry in entries)
    assert {entry["service"] for entry in entries} == {"worker"}
    [succeeded] = [e for e in entries if "succeeded" in e["message"]]
    assert succeeded["logger"] == "celery.app.trace"
    assert succeeded["scan_id"] == logged.scan_id
    assert succeeded["task_id"] == logged.task_id
    # The main process received it, outside any task: the id comes from Celery's record.
    [received] = [e for e in entries if e["message"].endswith("] received")]
    assert received["task_id"] == logged.task_id
    assert received["pid"] != succeeded["pid"]
    main = [e for e in entries if e["pid"] == received["pid"]]
    assert not any("scan_id" in e for e in main), "a task's context leaked out of it"


def format_in_context(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    """Formats as a task or request would, in a context of its own."""

    def run() -> str:
        bind_scan(task_id="t-1")
        bind_scan(scan_id="s-1")
        return formatter.format(record)

    return contextvars.copy_context().run(run)


def record(message: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("cybersec.test", logging.ERROR, __file__, 1, message, args, exc_info)


def test_json_line_carries_the_bound_ids_and_the_exception() -> None:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        line = format_in_context(JsonFormatter("worker"), record("scan %s failed", "x", exc=exc))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["message"] == "scan x failed"
    assert (entry["service"], entry["level"], entry["logger"]) == (
        "worker",
        "ERROR",
        "cybersec.test",
    )
    assert (entry["scan_id"], entry["task_id"]) == ("s-1", "t-1")
    assert entry["exception"].endswith("ValueError: boom")
    assert bound_scan() == (None, None), "binding stayed in its context"


def test_json_line_survives_text_orjson_refuses() -> None:
    entry = json.loads(JsonFormatter("api").format(record("bad \udc80 byte")))
    assert entry["message"] == "bad \udc80 byte"
    assert "scan_id" not in entry


def test_unbind_scan_forgets_the_ids() -> None:
    def run() -> tuple[str | None, str | None]:
        bind_scan(scan_id="s", task_id="t")
        unbind_scan()
        return bound_scan()

    assert contextvars.copy_context().run(run) == (None, None)


def test_text_format_tags_lines_with_the_ids() -> None:
    line = format_in_context(TextFormatter("api"), record("hello"))
    assert line.endswith("ERROR   api cybersec.test: hello [scan_id=s-1 task_id=t-1]")


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_configure_logging_routes_every_logger_to_stderr(fmt: str) -> None:
    script = (
        "import logging, warnings\n"
        "from shared.logging import configure_logging\n"
        f"configure_logging('info', 'api', {fmt!r})\n"
        "logging.getLogger('uvicorn.access').info('%s - \"%s %s HTTP/%s\" %d',"
        " '127.0.0.1:1', 'GET', '/healthz', '1.1', 200)\n"
        "logging.getLogger('celery.app.trace').debug('below the level')\n"
        "warnings.warn('careful')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    if fmt == "text":
        assert " INFO    api uvicorn.access: 127.0.0.1:1 - " in lines[0]
        assert "WARNING api py.warnings: " in lines[1]
        assert "below the level" not in done.stderr
        return
    entries = [json.loads(line) for line in io.StringIO(done.stderr)]
    assert [e["logger"] for e in entries] == ["uvicorn.access", "py.warnings"]
    access = entries[0]
    assert (access["method"], access["path"], access["status"]) == ("GET", "/healthz", 200)
    assert "careful" in entries[1]["message"]
