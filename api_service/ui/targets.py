"""Per target: open ports over time (a chart drawn from the scans the list API returns)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api_service.routes import scans as api_scans
from api_service.ui.bridge import call_json
from api_service.ui.render import page
from api_service.ui.signin import SignedIn, signed_in

HISTORY = 200
"""Scans read for the page: the API's largest page, newest first."""


def by_target(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per target, most recently scanned first, with its completed scans' history."""
    targets: dict[str, dict[str, Any]] = {}
    for item in items:  # newest first
        entry = targets.setdefault(
            item["target"], {"target": item["target"], "last": item, "scans": 0, "points": []}
        )
        entry["scans"] += 1
        if item["state"] == "completed" and item["open_ports"] is not None:
            entry["points"].append((item["created_at"], item["open_ports"], item["task_id"]))
    for entry in targets.values():
        entry["points"].reverse()
        entry["chart"] = orjson.dumps(
            {
                "x": [datetime.fromisoformat(p[0]).timestamp() for p in entry["points"]],
                "y": [p[1] for p in entry["points"]],
            }
        ).decode()
    return list(targets.values())


@signed_in
async def target_list(request: Request, user: SignedIn) -> Response:
    body = await call_json(
        request, user.key_id, api_scans.list_scans, query={"limit": str(HISTORY)}
    )
    context = {
        "session": user.session,
        "targets": by_target(body["items"]),
        "truncated": body["next_cursor"] is not None,
        "history": HISTORY,
    }
    return page(request, "targets.html", context)


routes = [Route("/targets", target_list, methods=["GET"])]
