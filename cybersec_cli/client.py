"""The API client commands: start a scan and follow it live, read states, results, exports, diffs.

Connection: ``--api-url`` / ``--api-key`` win over ``CYBERSEC_API_URL`` / ``CYBERSEC_API_KEY``,
which win over ``api_url`` / ``api_key`` in ``$CYBERSEC_CONFIG`` (default
``~/.config/cybersec/config.toml``). Data goes to stdout, progress and errors to stderr; an error
is one line, ``error: <message> (<code>)``, and the exit code says which kind (``EXIT_CODES``).
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import time
import tomllib
from collections.abc import Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Final, TypeVar
from urllib.parse import quote

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from shared.diff import ScanDiff
from shared.exports import address_key
from shared.schemas import PortResult, ScanResult

EXIT_USAGE: Final = 2
EXIT_AUTH: Final = 3
EXIT_NOT_FOUND: Final = 4
EXIT_RATE_LIMITED: Final = 5
EXIT_SERVER: Final = 6
EXIT_CONNECTION: Final = 7
EXIT_SCAN_FAILED: Final = 8
EXIT_INTERRUPTED: Final = 130
EXIT_CODES: Final[dict[int, str]] = {
    0: "success",
    EXIT_USAGE: "bad usage, bad config, or the API rejected the request (other 4xx)",
    EXIT_AUTH: "the API refused the key (401, 403)",
    EXIT_NOT_FOUND: "no such scan (404)",
    EXIT_RATE_LIMITED: "rate limited (429)",
    EXIT_SERVER: "the API failed or is unavailable (5xx), or answered something unreadable",
    EXIT_CONNECTION: "the API could not be reached or did not answer in time",
    EXIT_SCAN_FAILED: "scan --wait: the scan ended FAILURE or REVOKED",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C); the scan goes on on the server",
}

DEFAULT_API_URL: Final = "http://127.0.0.1:8000"
TERMINAL_STATES: Final = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
POLL_INTERVAL: Final = 0.5
STREAM_RESUMES: Final = 3
_TIMEOUT: Final = httpx.Timeout(10.0, read=30.0)
M = TypeVar("M", ScanResult, ScanDiff)


class ClientError(Exception):
    """A failure to report as one line and an exit code."""

    def __init__(self, message: str, code: str, exit_code: int) -> None:
        super().__init__(message)
        self.message = " ".join(message.split())
        self.code = code
        self.exit_code = exit_code


# --- where the API is ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connection:
    api_url: str
    api_key: str | None


def config_path(env: Mapping[str, str]) -> Path:
    if path := env.get("CYBERSEC_CONFIG"):
        return Path(path).expanduser()
    base = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else Path.home() / ".config"
    return base / "cybersec" / "config.toml"


def load_config(path: Path) -> dict[str, str]:
    """``api_url`` and ``api_key`` from a TOML file; a missing file is an empty config."""
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ClientError(f"config file {path}: {exc}", "bad_config", EXIT_USAGE) from None
    unknown = sorted(data.keys() - {"api_url", "api_key"})
    if unknown:
        raise ClientError(
            f"config file {path}: unknown key {unknown[0]!r} (known: api_url, api_key)",
            "bad_config",
            EXIT_USAGE,
        )
    for key, value in data.items():
        if not isinstance(value, str):
            raise ClientError(
                f"config file {path}: {key} is not a string", "bad_config", EXIT_USAGE
            )
    return dict(data)


def resolve_connection(
    api_url: str | None, api_key: str | None, env: Mapping[str, str] | None = None
) -> Connection:
    """Flags, then the environment, then the config file, then the local default."""
    env = os.environ if env is None else env
    url = api_url or env.get("CYBERSEC_API_URL")
    key = api_key or env.get("CYBERSEC_API_KEY")
    if url is None or key is None:
        config = load_config(config_path(env))
        url = url or config.get("api_url")
        key = key or config.get("api_key")
    url = (url or DEFAULT_API_URL).rstrip("/")
    if httpx.URL(url).scheme not in ("http", "https") or not httpx.URL(url).host:
        raise ClientError(f"API URL {url!r} is not an http(s) URL", "bad_config", EXIT_USAGE)
    return Connection(url, key or None)


# --- talking to it ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str
    data: str
    id: str | None = None


def parse_sse(lines: Iterable[str]) -> Iterator[SseEvent]:
    """Server-Sent Events from a stream of lines, as the HTML living standard parses them."""
    event, data, last_id = "", list[str](), None
    for line in lines:
        if not line:
            if data:
                yield SseEvent(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id" and "\0" not in value:
            last_id = value


def api_error(response: httpx.Response) -> ClientError:
    """The API's ``{"error": {"code", "message"}}`` body, or the status line when it has none."""
    status = response.status_code
    code, message = f"http_{status}", f"HTTP {status} {response.reason_phrase}".strip()
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
        code = str(error.get("code") or code)
    if status in (401, 403):
        exit_code = EXIT_AUTH
    elif status == 404:
        exit_code = EXIT_NOT_FOUND
    elif status == 429:
        exit_code = EXIT_RATE_LIMITED
        if retry := response.headers.get("retry-after"):
            message += f"; retry after {retry} s"
    elif status >= 500:
        exit_code = EXIT_SERVER
    else:
        exit_code = EXIT_USAGE
    return ClientError(message, code, exit_code)


def task_path(task_id: str, suffix: str = "") -> str:
    return f"/api/scan/{quote(task_id.strip(), safe='')}{suffix}"


class Api:
    """A synchronous httpx client for the API, raising :class:`ClientError` on every failure."""

    def __init__(self, connection: Connection) -> None:
        headers = {"user-agent": "cybersec-cli", "accept": "application/json"}
        if connection.api_key:
            headers["authorization"] = f"Bearer {connection.api_key}"
        self.url = connection.api_url
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=_TIMEOUT)

    def __enter__(self) -> Api:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.is_error:
            raise api_error(response)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"the API answered {path} with something that is not JSON",
                "bad_response",
                EXIT_SERVER,
            ) from None

    def events(self, task_id: str, last_id: str | None = None) -> Generator[SseEvent] | None:
        """The scan's event stream (after ``last_id``), or None when the API has none (404)."""
        headers = {"accept": "text/event-stream"}
        if last_id is not None:
            headers["last-event-id"] = last_id
        request = self._http.build_request("GET", task_path(task_id, "/events"), headers=headers)
        try:
            response = self._http.send(request, stream=True)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None
        if response.status_code == 404:
            response.close()
            return None
        if response.is_error:
            response.read()
            response.close()
            raise api_error(response)
        return self._stream(response)

    @staticmethod
    def _stream(response: httpx.Response) -> Generator[SseEvent]:
        try:
            yield from parse_sse(response.iter_lines())
        finally:
            response.close()

    def _unreachable(self, exc: httpx.TransportError) -> ClientError:
        if isinstance(exc, httpx.TimeoutException):
            return ClientError(
                f"the API at {self.url} did not answer in time", "timeout", EXIT_CONNECTION
            )
        reason = str(exc) or type(exc).__name__
        return ClientError(
            f"cannot reach the API at {self.url}: {reason}", "connection_failed", EXIT_CONNECTION
        )


def _model(model: type[M], data: Any, what: str) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = f"unexpected {what} from the API: {where}: {first['msg']}"
        raise ClientError(message, "bad_response", EXIT_SERVER) from None


# --- showing it ---------------------------------------------------------------------------


def result_table(result: ScanResult) -> Table:
    open_ports = sorted(
        (p for p in result.open_ports if p.state == "open"),
        key=lambda p: (address_key(p.address or ""), p.port),
    )
    table = Table(
        title=f"{result.target}: {len(open_ports)} open of {result.total_ports_scanned} ports",
        caption=(
            f"{result.closed_ports} closed, {result.filtered_ports} filtered, "
            f"{result.duration_seconds:.2f} s"
        ),
    )
    for column in ("address", "port", "state", "service", "product", "version", "reason"):
        table.add_column(column, justify="right" if column == "port" else "left")
    for port in open_ports:
        table.add_row(
            port.address or result.target,
            str(port.port),
            port.state,
            *(Text(v or "") for v in (port.service, port.product, port.version, port.reason)),
        )
    return table


def print_diff(console: Console, diff: ScanDiff) -> None:
    """A header naming both scans, a table of what changed (if anything), a count line."""
    for side, ref in (("old", diff.old), ("new", diff.new)):
        task = f", task {ref.task_id}" if ref.task_id else ""
        line = f"{side}: scan {ref.scan_id}{task}, {ref.target} {ref.ports}"
        console.print(Text(f"{line}, {_when(ref.started_at)}"), soft_wrap=True)
    table = Table()
    for column in ("change", "address", "port", "service", "details"):
        table.add_column(column, justify="right" if column == "port" else "left")

    def row(mark: str, style: str, port: PortResult, details: str = "") -> None:
        service = " ".join(v for v in (port.service, port.product, port.version) if v)
        table.add_row(
            Text(mark, style=style), port.address or "", str(port.port), Text(service), details
        )

    for port in diff.newly_open:
        row("+ opened", "green", port)
    for port in diff.newly_closed:
        row("- closed", "red", port)
    for change in diff.changed:
        details = ", ".join(
            f"{f}: {getattr(change.before, f) or '-'} -> {getattr(change.after, f) or '-'}"
            for f in change.changed
        )
        row("~ changed", "yellow", change.after, details)
    for port in diff.not_rescanned:
        row("? not rescanned", "dim", port)
    if table.row_count:
        console.print(table)
    console.print(
        f"{len(diff.newly_open)} opened, {len(diff.newly_closed)} closed, "
        f"{len(diff.changed)} changed, {diff.unchanged} unchanged"
        + (f", {len(diff.not_rescanned)} not rescanned" if diff.not_rescanned else ""),
        soft_wrap=True,
    )


def _when(moment: datetime | str | None) -> str:
    """A timestamp as ``2026-11-25 14:22:25 UTC``; text that is not one, as it is."""
    if isinstance(moment, str):
        try:
            parsed = datetime.fromisoformat(moment)
        except ValueError:
            return moment
    elif moment is None:
        return ""
    else:
        parsed = moment
    if parsed.tzinfo is None:
        return parsed.strftime("%Y-%m-%d %H:%M:%S")
    return parsed.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def status_table(status: Mapping[str, Any]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    done, total = status.get("ports_scanned"), status.get("total_ports")
    rows = {
        "task": status.get("task_id"),
        "scan": status.get("scan_id"),
        "state": status.get("state"),
        "status": status.get("status"),
        "progress": f"{status.get('progress', 0)}%",
        "tier": status.get("tier"),
        "ports": f"{done}/{total}" if done is not None and total is not None else None,
        "open": ", ".join(map(str, status.get("open_ports_found") or [])) or None,
        "created": _when(status.get("created_at")) or None,
        "error": status.get("error"),
    }
    for name, value in rows.items():
        if value is not None:
            grid.add_row(name, Text(str(value)))
    return grid


class LiveProgress:
    """A progress bar on stderr fed by SSE events or polled states; open ports print above it."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ports, {task.fields[open]} open"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._progress.add_task("queued", total=None, open=0)
        self._pairs: set[tuple[str, int]] = set()
        self._ports: set[int] = set()

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def update(self, data: Mapping[str, Any]) -> None:
        """A ``progress`` event or a polled ScanStatus."""
        for port in data.get("open_ports") or data.get("open_ports_found") or []:
            if isinstance(port, int) and port not in self._ports:
                self._ports.add(port)
                self._progress.console.print(Text(f"open  port {port}", style="green"))
        total = data.get("total_ports") or None
        tier = data.get("tier")
        description = f"{tier} tier" if tier else str(data.get("status") or data.get("state", ""))
        self._progress.update(
            self._task,
            description=description,
            completed=data.get("ports_scanned") or 0,
            total=total,
            open=max(len(self._pairs), len(self._ports)),
        )

    def port(self, data: Mapping[str, Any]) -> None:
        """A ``port`` event: one open port, as it was found."""
        port, address = data.get("port"), data.get("address")
        if not isinstance(port, int) or (str(address), port) in self._pairs:
            return
        self._pairs.add((str(address), port))
        self._ports.add(port)
        where = f"{address}:{port}" if address else f"port {port}"
        self._progress.console.print(Text(f"open  {where}", style="green"))
        self._progress.update(self._task, open=max(len(self._pairs), len(self._ports)))

    def finish(self, status: Mapping[str, Any]) -> None:
        total = status.get("total_ports") or self._progress.tasks[0].total
        if status.get("state") == "SUCCESS" and total:
            self._progress.update(self._task, completed=total, total=total)
        self._progress.update(self._task, description=str(status.get("state", "")).lower())


def follow(api: Api, task_id: str, err: Console) -> dict[str, Any]:
    """Show a scan live until it ends; its final ScanStatus. SSE, else polling every 0.5 s."""
    with LiveProgress(err) as view:
        final = _follow_events(api, task_id, view)
        if final is None:
            final = _poll(api, task_id, view)
        view.finish(final)
    return final


def _follow_events(api: Api, task_id: str, view: LiveProgress) -> dict[str, Any] | None:
    """The final status from the event stream, resuming a broken stream after the last event
    seen (``Last-Event-ID``); None when there is no stream or it keeps breaking."""
    last_id: str | None = None
    for _ in range(1 + STREAM_RESUMES):
        events = api.events(task_id, last_id)
        if events is None:
            return None
        try:
            for event in events:
                last_id = event.id or last_id
                try:
                    data = json.loads(event.data)
                except ValueError:
                    continue
                if not isinstance(data, dict):
                    continue
                if event.event == "progress":
                    view.update(data)
                elif event.event == "port":
                    view.port(data)
                elif event.event == "end":
                    return data
        except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError):
            pass
        finally:
            events.close()
    return None


def _poll(api: Api, task_id: str, view: LiveProgress) -> dict[str, Any]:
    while True:
        status: dict[str, Any] = api.json("GET", task_path(task_id))
        if status.get("state") in TERMINAL_STATES:
            return status
        view.update(status)
        time.sleep(POLL_INTERVAL)


# --- the commands -------------------------------------------------------------------------


class Priority(StrEnum):
    low = "low"
    normal = "normal"
    high = "high"
    critical = "critical"


class ScanRowState(StrEnum):
    queued = "queued"
    running = "running"
    completed = "completed"
    failed = "failed"
    revoked = "revoked"


class ResultFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"
    nmap_xml = "nmap-xml"


ApiUrl = Annotated[
    str | None,
    typer.Option(
        "--api-url",
        help="API base URL (env CYBERSEC_API_URL, config api_url; default http://127.0.0.1:8000)",
    ),
]
ApiKey = Annotated[
    str | None, typer.Option("--api-key", help="API key (env CYBERSEC_API_KEY, config api_key)")
]
TaskId = Annotated[str, typer.Argument(help="The task id `scan` printed")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the API's JSON instead of a table")]

app = typer.Typer(
    help="Client of the cybersec-scan API.",
    no_args_is_help=True,
    epilog="Exit codes: "
    + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items() if code),
)


@dataclass(frozen=True, slots=True)
class Session:
    api: Api
    out: Console
    err: Console


@contextmanager
def session(api_url: str | None, api_key: str | None) -> Iterator[Session]:
    """An API connection and consoles; a :class:`ClientError` inside becomes one line + exit."""
    out, err = Console(highlight=False), Console(stderr=True, highlight=False)
    try:
        connection = resolve_connection(api_url, api_key)
        _warn_cleartext_key(connection, err)
        with Api(connection) as api:
            yield Session(api, out, err)
    except ClientError as exc:
        err.print(Text(f"error: {exc.message} ({exc.code})", style="red"), soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None


def _warn_cleartext_key(connection: Connection, err: Console) -> None:
    url = httpx.URL(connection.api_url)
    if not connection.api_key or url.scheme != "http":
        return
    try:
        local = ipaddress.ip_address(url.host).is_loopback
    except ValueError:
        local = url.host == "localhost"
    if not local:
        err.print(
            Text(f"warning: sending the API key to {url.host} over plain HTTP", style="yellow"),
            soft_wrap=True,
        )


def _print_json(out: Console, data: Any) -> None:
    out.print(json.dumps(data, indent=2), soft_wrap=True, markup=False)


@app.command()
def scan(
    target: Annotated[str, typer.Argument(help="IP address, hostname or CIDR block")],
    ports: Annotated[str, typer.Option("--ports", "-p", help='e.g. "22,80,8000-8100"')] = "1-1000",
    priority: Annotated[Priority, typer.Option(help="Queue priority")] = Priority.normal,
    timeout: Annotated[
        float | None, typer.Option(help="Seconds per connect attempt", show_default=False)
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", "-w", help="Follow the scan live, then print the result")
    ] = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Start a scan; print its task id, or with --wait follow it and print the open ports."""
    body: dict[str, Any] = {"target": target, "ports": ports, "priority": priority.value}
    if timeout is not None:
        body["config"] = {"timeout": timeout}
    with session(api_url, api_key) as s:
        accepted = s.api.json("POST", "/api/scan", json=body)
        task_id = str(accepted.get("task_id", ""))
        s.err.print(Text(str(accepted.get("message") or f"queued {task_id}")), soft_wrap=True)
        if not wait:
            s.out.print(task_id, soft_wrap=True)
            return
        s.err.print(Text(f"task {task_id}"), soft_wrap=True)
        try:
            final = follow(s.api, task_id, s.err)
        except KeyboardInterrupt:
            s.err.print(f"interrupted; the scan goes on: cybersec status {task_id}", soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        state = final.get("state")
        if state == "FAILURE":
            raise ClientError(
                f"scan failed: {final.get('error') or 'no reason given'}", "scan_failed", 8
            )
        if state == "REVOKED":
            raise ClientError("the scan was cancelled", "scan_revoked", EXIT_SCAN_FAILED)
        s.out.print(result_table(_model(ScanResult, final.get("result"), "scan result")))


@app.command()
def status(
    task_id: TaskId, as_json: AsJson = False, api_url: ApiUrl = None, api_key: ApiKey = None
) -> None:
    """Show a scan's state and progress, and its open ports once it finished."""
    with session(api_url, api_key) as s:
        data = s.api.json("GET", task_path(task_id))
        if as_json:
            _print_json(s.out, data)
            return
        s.out.print(status_table(data))
        if data.get("result"):
            s.out.print(result_table(_model(ScanResult, data["result"], "scan result")))


@app.command("list")
def list_scans(
    limit: Annotated[int, typer.Option(min=1, max=200, help="Scans per page")] = 20,
    state: Annotated[
        ScanRowState | None, typer.Option(help="Only scans in this state", show_default=False)
    ] = None,
    target: Annotated[str | None, typer.Option(help="Only scans of this target")] = None,
    cursor: Annotated[str | None, typer.Option(help="The page after this cursor")] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="Follow every page")] = False,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """List scans, newest first."""
    with session(api_url, api_key) as s:
        items: list[dict[str, Any]] = []
        seen: set[str] = set()
        while True:
            params = {
                "limit": limit,
                "cursor": cursor,
                "state": state.value if state else None,
                "target": target,
            }
            page = s.api.json(
                "GET", "/api/scans", params={k: v for k, v in params.items() if v is not None}
            )
            items.extend(page.get("items") or [])
            cursor = page.get("next_cursor")
            if not all_pages or cursor is None or cursor in seen:
                break
            seen.add(cursor)
        if as_json:
            _print_json(s.out, {"items": items, "next_cursor": cursor})
            return
        table = Table()
        for column in ("task id", "target", "ports", "state", "created"):
            table.add_column(column, no_wrap=column == "task id")
        for item in items:
            table.add_row(
                *(Text(str(item.get(k) or "")) for k in ("task_id", "target", "ports", "state")),
                _when(item.get("created_at")),
            )
        s.out.print(table)
        if cursor is not None and not all_pages:
            s.err.print(f"more: cybersec list --cursor {cursor}", soft_wrap=True, markup=False)


@app.command()
def cancel(task_id: TaskId, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """Cancel a queued or running scan."""
    with session(api_url, api_key) as s:
        data = s.api.json("DELETE", task_path(task_id))
        state = data.get("state", "REVOKED") if isinstance(data, dict) else "REVOKED"
        s.out.print(Text(f"{task_id}: {state}"), soft_wrap=True)


@app.command()
def result(
    task_id: TaskId,
    fmt: Annotated[ResultFormat, typer.Option("--format", "-f")] = ResultFormat.table,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file, not stdout")
    ] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Print a finished scan's result: a table, or an export (json, csv, nmap-xml for ndiff)."""
    with session(api_url, api_key) as s:
        wire = "json" if fmt is ResultFormat.table else fmt.value
        response = s.api.request("GET", task_path(task_id, "/result"), params={"format": wire})
        if fmt is ResultFormat.table:
            try:
                data = response.json()
            except ValueError:
                data = None
            s.out.print(result_table(_model(ScanResult, data, "scan result")))
            return
        if output is not None:
            try:
                output.write_bytes(response.content)
            except OSError as exc:
                raise ClientError(
                    f"cannot write {output}: {exc.strerror}", "io_error", EXIT_USAGE
                ) from None
            s.err.print(Text(f"wrote {output}"), soft_wrap=True)
            return
        sys.stdout.flush()
        sys.stdout.buffer.write(response.content)
        sys.stdout.buffer.flush()


@app.command()
def diff(
    task_id: TaskId,
    against: Annotated[
        str, typer.Option(help='"previous" (the last scan of the same target) or a task id')
    ] = "previous",
    as_json: AsJson = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """What changed between a scan and an earlier one: ports opened, closed, services changed."""
    with session(api_url, api_key) as s:
        data = s.api.json("GET", task_path(task_id, "/diff"), params={"against": against})
        if as_json:
            _print_json(s.out, data)
            return
        print_diff(s.out, _model(ScanDiff, data, "diff"))


if __name__ == "__main__":
    app()
