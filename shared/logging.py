"""Log lines of both services: one JSON object per line, tagged with the scan they are about.

The scan and task ids live in context variables: the worker binds them around each task, the
gateway in the handlers that know them. Every record logged in that context carries them, the
libraries' own (uvicorn's access line, Celery's "Task ... succeeded") included.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Literal, TextIO
from uuid import UUID

import orjson

LogFormat = Literal["json", "text"]

_scan_id: ContextVar[str | None] = ContextVar("cybersec_scan_id", default=None)
_task_id: ContextVar[str | None] = ContextVar("cybersec_task_id", default=None)

_LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access")


def bind_scan(*, scan_id: UUID | str | None = None, task_id: UUID | str | None = None) -> None:
    """Tag every later log line of this context (a request, a task) with these ids.

    Only the ids given are set, so a handler can bind the task id first and the scan id later.
    """
    if scan_id is not None:
        _scan_id.set(str(scan_id))
    if task_id is not None:
        _task_id.set(str(task_id))


def unbind_scan() -> None:
    _scan_id.set(None)
    _task_id.set(None)


def bound_scan() -> tuple[str | None, str | None]:
    """(scan_id, task_id) bound in this context."""
    return _scan_id.get(), _task_id.get()


def _ids(record: logging.LogRecord) -> dict[str, str]:
    scan_id, task_id = bound_scan()
    ids = {
        "scan_id": getattr(record, "scan_id", None) or scan_id,
        "task_id": getattr(record, "task_id", None) or task_id or _celery_task_id(record),
    }
    return {key: str(value) for key, value in ids.items() if value}


def _celery_task_id(record: logging.LogRecord) -> object:
    # Celery's task lines ("Task ... received", "... succeeded") pass the task as a mapping;
    # the main process's "received" has no bound context, but its id is there.
    if record.name.startswith("celery.") and isinstance(record.args, Mapping):
        return record.args.get("id")
    return None


class JsonFormatter(logging.Formatter):
    """time, level, logger, message, service, pid, and scan_id/task_id when known."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self.service,
            "pid": record.process,
            **_ids(record),
        }
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            entry.update(_access_fields(record.args))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        try:
            return orjson.dumps(entry, default=str).decode()
        except TypeError:  # e.g. a lone surrogate, which orjson refuses and json escapes
            return json.dumps(entry, default=str)


def _access_fields(args: tuple[object, ...]) -> dict[str, object]:
    # uvicorn's access record: (client address, method, path with query, HTTP version, status)
    if len(args) != 5:
        return {}
    client, method, path, _version, status = args
    return {"client": client, "method": method, "path": path, "status": status}


class TextFormatter(logging.Formatter):
    """For people at a terminal: the same fields on one readable line."""

    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s " + service + " %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = _ids(record)
        if not ids:
            return line
        head, sep, tail = line.partition("\n")
        tags = " ".join(f"{key}={value}" for key, value in ids.items())
        return f"{head} [{tags}]{sep}{tail}"


class _Handler(logging.StreamHandler[TextIO]):
    """Marks the handler this module installed, so configuring again replaces it."""


def configure_logging(level: str, service: str, fmt: LogFormat = "json") -> None:
    """Send every record of the process (root and library loggers) to stderr in ``fmt``.

    Call once at process start, before the server or worker starts logging.
    """
    handler = _Handler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in _LIBRARY_LOGGERS:
        # Their records reach the root handler, and only it, in our format.
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
    logging.captureWarnings(True)
