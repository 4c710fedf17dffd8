"""``cybersec schedule …`` and ``cybersec webhook …``: recurring scans and their alerts."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.table import Table
from rich.text import Text

from cybersec_cli.client import ApiKey, ApiUrl, AsJson, Priority, _print_json, _when, session

schedule_app = typer.Typer(
    help="Recurring scans: a cron expression in a time zone, or an interval.",
    no_args_is_help=True,
)
webhook_app = typer.Typer(
    help="Signed webhooks (Standard Webhooks) on scan.completed, scan.failed, ports.changed.",
    no_args_is_help=True,
)

ScheduleId = Annotated[str, typer.Argument(help="The schedule's id")]
WebhookId = Annotated[str, typer.Argument(help="The webhook's id")]


def _path(kind: str, ident: str, suffix: str = "") -> str:
    return f"/api/{kind}/{quote(ident.strip(), safe='')}{suffix}"


def _schedule_table(items: list[dict[str, Any]]) -> Table:
    table = Table()
    for column in ("id", "name", "target", "ports", "when", "state", "next run"):
        table.add_column(column, no_wrap=column == "id")
    for item in items:
        when = (
            f"{item['cron']} {item['timezone']}"
            if item.get("cron")
            else f"every {item.get('interval_seconds')} s"
        )
        table.add_row(
            *(Text(str(item.get(k) or "")) for k in ("id", "name", "target", "ports")),
            Text(when),
            "enabled" if item.get("enabled") else "paused",
            _when(item.get("next_run_at")),
        )
    return table


@schedule_app.command("create")
def schedule_create(
    target: Annotated[str, typer.Argument(help="IP address, hostname or CIDR block")],
    cron: Annotated[
        str | None, typer.Option(help='5-field cron expression, e.g. "30 2 * * *"')
    ] = None,
    tz: Annotated[str, typer.Option("--tz", help="IANA time zone of --cron")] = "UTC",
    every: Annotated[
        int | None, typer.Option("--every", help="Interval in seconds (instead of --cron)")
    ] = None,
    ports: Annotated[str, typer.Option("--ports", "-p")] = "1-1000",
    priority: Annotated[Priority, typer.Option()] = Priority.normal,
    name: Annotated[str | None, typer.Option(help="A name to recognise it by")] = None,
    misfire: Annotated[
        str, typer.Option(help="skip or run_once: what a run missed beyond the grace period does")
    ] = "skip",
    grace: Annotated[int, typer.Option(help="Seconds a late run still fires on time")] = 300,
    exclude: Annotated[
        list[str] | None, typer.Option(help="Address or CIDR this schedule never scans")
    ] = None,
    paused: Annotated[bool, typer.Option("--paused", help="Create it paused")] = False,
    as_json: AsJson = False,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Create a schedule; prints its id."""
    body: dict[str, Any] = {
        "target": target,
        "ports": ports,
        "priority": priority.value,
        "timezone": tz,
        "misfire_policy": misfire,
        "misfire_grace_seconds": grace,
        "enabled": not paused,
        "exclude": exclude or [],
    }
    if cron is not None:
        body["cron"] = cron
    if every is not None:
        body["interval_seconds"] = every
    if name is not None:
        body["name"] = name
    with session(api_url, api_key) as s:
        created = s.api.json("POST", "/api/schedules", json=body)
        if as_json:
            _print_json(s.out, created)
            return
        s.err.print(Text(f"next run: {_when(created.get('next_run_at'))}"), soft_wrap=True)
        s.out.print(str(created.get("id", "")), soft_wrap=True)


@schedule_app.command("list")
def schedule_list(as_json: AsJson = False, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """This key's schedules."""
    with session(api_url, api_key) as s:
        data = s.api.json("GET", "/api/schedules")
        if as_json:
            _print_json(s.out, data)
        else:
            s.out.print(_schedule_table(data.get("items") or []))


@schedule_app.command("show")
def schedule_show(
    schedule_id: ScheduleId, as_json: AsJson = False, api_url: ApiUrl = None, api_key: ApiKey = None
) -> None:
    """One schedule, and its recent scans."""
    with session(api_url, api_key) as s:
        data = s.api.json("GET", _path("schedules", schedule_id))
        if as_json:
            _print_json(s.out, data)
            return
        s.out.print(_schedule_table([data]))
        scans = s.api.json("GET", "/api/scans", params={"schedule_id": data["id"], "limit": 10})
        for item in scans.get("items") or []:
            line = f"{_when(item.get('created_at'))}  {item.get('task_id')}  {item.get('state')}"
            s.out.print(Text(line), soft_wrap=True)


def _set_enabled(schedule_id: str, enabled: bool, api_url: str | None, api_key: str | None) -> None:
    with session(api_url, api_key) as s:
        data = s.api.json("PATCH", _path("schedules", schedule_id), json={"enabled": enabled})
        state = "resumed; next run " + _when(data.get("next_run_at")) if enabled else "paused"
        s.out.print(Text(f"{data.get('id')}: {state}"), soft_wrap=True)


@schedule_app.command("pause")
def schedule_pause(schedule_id: ScheduleId, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """Stop a schedule from firing until resumed."""
    _set_enabled(schedule_id, False, api_url, api_key)


@schedule_app.command("resume")
def schedule_resume(
    schedule_id: ScheduleId, api_url: ApiUrl = None, api_key: ApiKey = None
) -> None:
    """Fire again, from the next time after now (missed runs are not made up)."""
    _set_enabled(schedule_id, True, api_url, api_key)


@schedule_app.command("delete")
def schedule_delete(
    schedule_id: ScheduleId, api_url: ApiUrl = None, api_key: ApiKey = None
) -> None:
    """Delete a schedule; the scans it made stay."""
    with session(api_url, api_key) as s:
        s.api.request("DELETE", _path("schedules", schedule_id))
        s.out.print(Text(f"{schedule_id}: deleted"), soft_wrap=True)


@schedule_app.command("run-now")
def schedule_run_now(
    schedule_id: ScheduleId, api_url: ApiUrl = None, api_key: ApiKey = None
) -> None:
    """Run a schedule once now; prints the scan's task id."""
    with session(api_url, api_key) as s:
        data = s.api.json("POST", _path("schedules", schedule_id, "/run"))
        s.out.print(str(data.get("task_id", "")), soft_wrap=True)


@webhook_app.command("create")
def webhook_create(
    url: Annotated[str, typer.Argument(help="http(s) URL of the receiver")],
    event: Annotated[
        list[str] | None,
        typer.Option(help="scan.completed, scan.failed or ports.changed (repeatable)"),
    ] = None,
    schedule: Annotated[str | None, typer.Option(help="Only this schedule's scans")] = None,
    target: Annotated[str | None, typer.Option(help="Only scans of this target")] = None,
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Register a webhook; prints its id and its secret, which is not shown again."""
    body: dict[str, Any] = {"url": url, "events": event or ["ports.changed"]}
    if schedule is not None:
        body["schedule_id"] = schedule
    if target is not None:
        body["target"] = target
    with session(api_url, api_key) as s:
        created = s.api.json("POST", "/api/webhooks", json=body)
        s.err.print("store the secret now; it is not shown again", soft_wrap=True)
        s.out.print(f"{created.get('id')} {created.get('secret')}", soft_wrap=True, markup=False)


@webhook_app.command("list")
def webhook_list(as_json: AsJson = False, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """This key's webhooks (never their secrets)."""
    with session(api_url, api_key) as s:
        data = s.api.json("GET", "/api/webhooks")
        if as_json:
            _print_json(s.out, data)
            return
        table = Table()
        for column in ("id", "url", "events", "state"):
            table.add_column(column, no_wrap=column == "id")
        for item in data.get("items") or []:
            state = "enabled" if item.get("enabled") else f"disabled: {item.get('disabled_reason')}"
            table.add_row(
                Text(str(item.get("id"))),
                Text(str(item.get("url"))),
                Text(", ".join(item.get("events") or [])),
                Text(state),
            )
        s.out.print(table)


@webhook_app.command("delete")
def webhook_delete(webhook_id: WebhookId, api_url: ApiUrl = None, api_key: ApiKey = None) -> None:
    """Delete a webhook and its pending messages."""
    with session(api_url, api_key) as s:
        s.api.request("DELETE", _path("webhooks", webhook_id))
        s.out.print(Text(f"{webhook_id}: deleted"), soft_wrap=True)


@webhook_app.command("deliveries")
def webhook_deliveries(
    webhook_id: WebhookId, as_json: AsJson = False, api_url: ApiUrl = None, api_key: ApiKey = None
) -> None:
    """Recent messages to a webhook and how each attempt went."""
    with session(api_url, api_key) as s:
        data = s.api.json("GET", _path("webhooks", webhook_id, "/deliveries"))
        if as_json:
            _print_json(s.out, data)
            return
        table = Table()
        for column in ("message", "event", "state", "attempts", "last answer"):
            table.add_column(column, no_wrap=column == "message")
        for item in data.get("items") or []:
            history = item.get("history") or [{}]
            last = history[-1]
            answer = str(last.get("status_code") or last.get("error") or "")
            table.add_row(
                *(Text(str(item.get(k))) for k in ("id", "event_type", "state", "attempts")),
                Text(answer),
            )
        s.out.print(table)


@webhook_app.command("redeliver")
def webhook_redeliver(
    webhook_id: WebhookId,
    message_id: Annotated[str, typer.Argument(help="The message id (msg_…)")],
    api_url: ApiUrl = None,
    api_key: ApiKey = None,
) -> None:
    """Send a message again, from its first attempt."""
    with session(api_url, api_key) as s:
        s.api.json(
            "POST", _path("webhooks", webhook_id, f"/deliveries/{quote(message_id)}/redeliver")
        )
        s.out.print(Text(f"{message_id}: queued"), soft_wrap=True)
