"""Per target: open ports over time (a chart drawn from the scans the list API returns)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.routes import scans as api_scans
from api_service.routes import schedules as api_schedules
from api_service.ui.bridge import call_json
from api_service.ui.render import page
from api_service.ui.signin import SignedIn, signed_in

HISTORY = 200
"""Scans read for the page: the API's largest page, newest first."""


def next_runs(schedules: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per target, the active schedule that runs it next."""
    soonest: dict[str, dict[str, Any]] = {}
    for schedule in schedules:
        if not schedule["enabled"] or schedule["next_run_at"] is None:
            continue
        known = soonest.get(schedule["target"])
        if known is None or schedule["next_run_at"] < known["next_run_at"]:
            soonest[schedule["target"]] = schedule
    return soonest


def by_target(
    items: list[dict[str, Any]], schedules: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """One entry per target, most recently scanned first, with its completed scans' history and
    its next scheduled run; targets only scheduled so far come last."""
    upcoming = next_runs(schedules or [])
    targets: dict[str, dict[str, Any]] = {}
    for item in items:  # newest first
        entry = targets.setdefault(item["target"], _entry(item["target"], item))
        entry["scans"] += 1
        if item["state"] == "completed" and item["open_ports"] is not None:
            entry["points"].append((item["created_at"], item["open_ports"], item["task_id"]))
    for target in upcoming:
        targets.setdefault(target, _entry(target, None))
    for entry in targets.values():
        entry["next"] = upcoming.get(entry["target"])
        entry["points"].reverse()
        entry["chart"] = orjson.dumps(
            {
                "x": [datetime.fromisoformat(p[0]).timestamp() for p in entry["points"]],
                "y": [p[1] for p in entry["points"]],
            }
        ).decode()
    return list(targets.values())


def _entry(target: str, last: dict[str, Any] | None) -> dict[str, Any]:
    return {"target": target, "last": last, "scans": 0, "points": []}


@signed_in
async def target_list(request: Request, user: SignedIn) -> Response:
    body = await call_json(
        request, user.key_id, api_scans.list_scans, query={"limit": str(HISTORY)}
    )
    schedules = await call_json(request, user.key_id, api_schedules.list_schedules)
    context = {
        "session": user.session,
        "targets": by_target(body["items"], schedules["items"]),
        "truncated": body["next_cursor"] is not None,
        "history": HISTORY,
    }
    return page(request, "targets.html", context)


routes = [Route("/targets", target_list, methods=["GET"])]
