"""Prometheus metrics of a real gateway and a real prefork worker, after scans over HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from celery import Celery
from prometheus_client.parser import text_string_to_metric_families

from api_service.app import create_app
from bench._stack import free_port
from shared.settings import Settings
from tests.conftest import (
    Process,
    auth,
    base_url,
    delete_queues,
    start_api,
    start_worker,
    variant,
)
from worker_service.celery_app import make_celery
from worker_service.metrics import MULTIPROC_ENV, install_metrics

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Stack:
    settings: Settings
    api: str
    worker_metrics: str
    worker: Process


@pytest.fixture(scope="module")
def stack(
    settings: Settings, run_dir: Path, database: str, redis_client: object
) -> Iterator[Stack]:
    metered = variant(settings, "metrics", run_dir, metrics_port=free_port())
    worker = start_worker(metered, run_dir / "worker-metrics.log")
    api = start_api(metered, run_dir / "api-metrics.log")
    try:
        yield Stack(
            metered, base_url(metered), f"http://127.0.0.1:{metered.metrics_port}/metrics", worker
        )
    finally:
        api.stop()
        worker.stop()
        asyncio.run(delete_queues(metered))


def scrape(url: str) -> Samples:
    response = httpx.get(url, timeout=5)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape_until(url: str, done: Callable[[Samples], bool], timeout: float = 15) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        try:
            samples = scrape(url)
        except httpx.ConnectError:
            # A worker's heartbeat can show a moment before its metrics server listens.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
            continue
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def run_scan(client: httpx.Client, ports: list[int]) -> dict[str, str]:
    spec = ",".join(map(str, ports))
    response = client.post("/api/scan", json={"target": "127.0.0.1", "ports": spec})
    assert response.status_code == 202, response.text
    accepted: dict[str, str] = response.json()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = client.get(f"/api/scan/{accepted['task_id']}").json()["state"]
        if state in ("SUCCESS", "FAILURE", "REVOKED"):
            assert state == "SUCCESS"
            return accepted
        time.sleep(0.05)
    pytest.fail(f"scan {accepted['task_id']} did not finish")


@pytest.fixture(scope="module")
def scanned(stack: Stack, api_key: str) -> Iterator[dict[str, str]]:
    """One finished scan of loopback listeners, one 422, one unknown route, one SSE read."""
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    try:
        ports = sorted(s.getsockname()[1] for s in servers)
        with httpx.Client(base_url=stack.api, timeout=10, headers=auth(api_key)) as client:
            accepted = run_scan(client, ports)
            bad = client.post("/api/scan", json={"target": "127.0.0.1", "ports": "80-20"})
            assert bad.status_code == 422
            assert client.get("/no/such/route").status_code == 404
            events = client.get(f"/api/scan/{accepted['task_id']}/events")
            assert events.status_code == 200
            assert events.headers["content-type"].startswith("text/event-stream")
            assert "event: end" in events.text
        yield accepted
    finally:
        for server in servers:
            server.close()


def test_api_counts_requests_by_route_template(stack: Stack, scanned: dict[str, str]) -> None:
    samples = scrape(f"{stack.api}/metrics")
    requests = "cybersec_api_requests_total"
    assert value(samples, requests, method="POST", route="/api/scan", status="202") >= 1
    assert value(samples, requests, method="GET", route="/api/scan/{task_id}", status="200") >= 1
    events = {"method": "GET", "route": "/api/scan/{task_id}/events", "status": "200"}
    assert value(samples, requests, **events) == 1
    assert value(samples, requests, method="GET", route="unmatched", status="404") == 1
    labels = {v for _name, pairs in samples for _k, v in pairs}
    assert not any(scanned["task_id"] in label for label in labels), "raw paths leaked"
    latency = "cybersec_api_request_duration_seconds_count"
    assert value(samples, latency, method="POST", route="/api/scan") >= 1


def test_api_counts_errors_by_code(stack: Stack, scanned: dict[str, str]) -> None:
    samples = scrape(f"{stack.api}/metrics")
    assert value(samples, "cybersec_api_errors_total", code="validation_error") >= 1
    assert value(samples, "cybersec_api_errors_total", code="not_found") >= 1
    assert value(samples, "cybersec_api_errors_total", code="unknown") == 0


def test_api_times_publisher_confirms(stack: Stack, scanned: dict[str, str]) -> None:
    samples = scrape(f"{stack.api}/metrics")
    assert value(samples, "cybersec_api_publishes_total") >= 1
    assert value(samples, "cybersec_api_publish_confirm_seconds_count") >= 1
    assert value(samples, "cybersec_api_publish_confirm_seconds_sum") > 0
    assert value(samples, "cybersec_api_publish_failures_total") == 0
    assert value(samples, "process_resident_memory_bytes") > 0


def test_metrics_endpoint_needs_no_key(stack: Stack) -> None:
    assert httpx.get(f"{stack.api}/metrics").status_code == 200


def test_worker_counts_scans_from_its_children(stack: Stack, scanned: dict[str, str]) -> None:
    def finished(samples: Samples) -> bool:
        return (
            value(samples, "cybersec_worker_scans_finished_total", outcome="success") >= 1
            and value(samples, "cybersec_worker_queue_wait_seconds_count") >= 1
        )

    samples = scrape_until(stack.worker_metrics, finished)
    assert value(samples, "cybersec_worker_scans_started_total") >= 1
    assert value(samples, "cybersec_worker_scans_finished_total", outcome="success") >= 1
    assert value(samples, "cybersec_worker_scans_finished_total", outcome="failure") == 0
    duration = "cybersec_worker_scan_duration_seconds_count"
    assert value(samples, duration, outcome="success") >= 1
    assert value(samples, "cybersec_worker_ports_scanned_total") >= 2
    assert value(samples, "cybersec_worker_scan_ports_per_second_count") >= 1
    assert value(samples, "cybersec_worker_queue_wait_seconds_count") >= 1
    assert value(samples, "cybersec_worker_queue_wait_seconds_sum") >= 0


def test_worker_metrics_directory_lives_as_long_as_the_worker(
    settings: Settings,
    run_dir: Path,
    database: str,
    redis_client: object,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    short = variant(settings, "metrics-exit", run_dir, metrics_port=free_port())
    tmp = run_dir / "metrics-exit-tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))  # the worker makes its directory in there
    worker = start_worker(short, run_dir / "worker-metrics-exit.log", concurrency=1)
    url = f"http://127.0.0.1:{short.metrics_port}/metrics"
    try:
        samples = scrape_until(url, bool)
        assert value(samples, "cybersec_worker_scans_finished_total", outcome="retry") == 0
        [directory] = tmp.glob("cybersec-worker-metrics-*")
        assert any(directory.glob("*.db")), "no process wrote samples"
    finally:
        worker.stop()
        asyncio.run(delete_queues(short))
    assert not directory.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)


def test_each_app_has_its_own_registry(settings: Settings) -> None:
    first, second = create_app(settings), create_app(settings)
    assert first.state.metrics.registry is not second.state.metrics.registry
    first.state.metrics.requests.labels("GET", "/healthz", "200").inc()
    assert (
        second.state.metrics.registry.get_sample_value(
            "cybersec_api_requests_total", {"method": "GET", "route": "/healthz", "status": "200"}
        )
        is None
    )


def test_worker_metrics_refuse_to_start_without_multiprocess_mode(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(MULTIPROC_ENV, raising=False)
    app: Celery = make_celery(settings)
    try:
        with pytest.raises(RuntimeError, match=MULTIPROC_ENV):
            install_metrics(app, settings.model_copy(update={"metrics_port": free_port()}))
        assert install_metrics(app, settings) is None  # port 0: off
    finally:
        app.close()
