"""The gateway's Prometheus metrics: a pure ASGI middleware, a metered publisher, ``GET /metrics``.

Each app owns its registry (``create_app`` makes one), so two apps in a process never share
counters. Labels are bounded: the route template rather than the path, known methods only, and
error codes from our own error bodies.
"""

from __future__ import annotations

import re
import time

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_service.publisher import TaskPublisher
from shared.protocol import TaskMessage

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"
UNKNOWN_CODE = "unknown"
_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")

PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ApiMetrics:
    """Every metric the gateway exports, registered in one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self.requests = Counter(
            "cybersec_api_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cybersec_api_request_duration_seconds",
            "Time from a request's arrival to the end of its response (streams included).",
            ["method", "route"],
            registry=self.registry,
        )
        self.errors = Counter(
            "cybersec_api_errors",
            "Error responses, by the code of the error body.",
            ["code"],
            registry=self.registry,
        )
        self.publishes = Counter(
            "cybersec_api_publishes",
            "Scan messages the gateway tried to publish.",
            registry=self.registry,
        )
        self.publish_failures = Counter(
            "cybersec_api_publish_failures",
            "Publishes the broker did not confirm (answered 503).",
            registry=self.registry,
        )
        self.publish_confirm = Histogram(
            "cybersec_api_publish_confirm_seconds",
            "Time from publishing a scan message to the broker's confirm.",
            buckets=PUBLISH_BUCKETS,
            registry=self.registry,
        )

    def observe(
        self, method: str, route: str, status: int, code: str | None, seconds: float
    ) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)
        if status >= 400:
            self.errors.labels(code or UNKNOWN_CODE).inc()


def error_code(body: bytes) -> str:
    """The ``error.code`` of one of our error bodies; ``unknown`` for any other body."""
    try:
        code = orjson.loads(body)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return UNKNOWN_CODE
    return code if isinstance(code, str) and _CODE.fullmatch(code) else UNKNOWN_CODE


class MetricsMiddleware:
    """Counts and times every HTTP request without touching its body stream.

    Pure ASGI, so a streaming response (SSE) passes through untouched; only the first body
    chunk of an error response is read, to label the error by its code.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0
        code: str | None = None

        async def send_with_metrics(message: Message) -> None:
            nonlocal status, code
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and code is None:
                code = error_code(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, send_with_metrics)
        except Exception:
            if not status:  # the server's error middleware answers 500 with internal_error
                status, code = 500, "internal_error"
            raise
        finally:
            if status:  # nothing is counted for a request abandoned before any answer
                method = scope["method"] if scope["method"] in METHODS else "other"
                route = getattr(scope.get("route"), "path", None) or UNMATCHED
                self.metrics.observe(method, route, status, code, time.perf_counter() - start)


class MeteredPublisher:
    """A :class:`TaskPublisher` that times each publish up to the broker's confirm."""

    def __init__(self, inner: TaskPublisher, metrics: ApiMetrics) -> None:
        self.inner = inner
        self.metrics = metrics

    async def publish(self, message: TaskMessage) -> None:
        self.metrics.publishes.inc()
        start = time.perf_counter()
        try:
            await self.inner.publish(message)
        except Exception:
            self.metrics.publish_failures.inc()
            raise
        self.metrics.publish_confirm.observe(time.perf_counter() - start)

    async def ready(self) -> bool:
        return await self.inner.ready()


async def metrics_endpoint(request: Request) -> Response:
    metrics: ApiMetrics = request.app.state.metrics
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(metrics.registry), headers={"Content-Type": content_type})


routes = [Route("/metrics", metrics_endpoint, methods=["GET"])]
