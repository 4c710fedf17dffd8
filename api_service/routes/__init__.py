"""The gateway's routes, one module per group."""

from __future__ import annotations

from starlette.routing import BaseRoute

from api_service import metrics
from api_service.routes import docs, probes, results, scans, schedules, webhooks

routes: list[BaseRoute] = [
    *scans.routes,
    *results.routes,
    *schedules.routes,
    *webhooks.routes,
    *probes.routes,
    *docs.routes,
    *metrics.routes,
]
