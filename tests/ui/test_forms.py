"""The schedule and webhook forms become the API's request bodies; targets learn their next run."""

from __future__ import annotations

from typing import Any

from api_service.ui.schedules import schedule_request
from api_service.ui.targets import by_target
from api_service.ui.webhooks import webhook_request
from shared.schedules import ScheduleCreate
from shared.webhooks import WebhookCreate


def test_a_cron_schedule_form_is_a_valid_api_body() -> None:
    body = schedule_request(
        {
            "name": " nightly ",
            "target": " 127.0.0.1 ",
            "ports": "22,80",
            "priority": "high",
            "timing": "cron",
            "cron": "30 2 * * *",
            "timezone": "Europe/Berlin",
            "interval_seconds": "3600",  # ignored: the form chose cron
            "misfire_policy": "run_once",
            "misfire_grace_seconds": "600",
            "timeout": "0.5",
            "exclude": "127.0.0.9, 127.0.1.0/24,",
        }
    )
    spec = ScheduleCreate.model_validate(body)
    assert (spec.name, spec.target, spec.cron, spec.timezone) == (
        "nightly",
        "127.0.0.1",
        "30 2 * * *",
        "Europe/Berlin",
    )
    assert spec.interval_seconds is None
    assert (spec.misfire_policy, spec.misfire_grace_seconds) == ("run_once", 600)
    assert body["exclude"] == ["127.0.0.9", "127.0.1.0/24"]
    assert spec.exclude == ["127.0.0.9/32", "127.0.1.0/24"]
    assert spec.config.timeout == 0.5
    assert spec.config.service_detection is False


def test_an_interval_form_leaves_bad_numbers_to_the_api() -> None:
    body = schedule_request({"target": "h", "timing": "interval", "interval_seconds": "soon"})
    assert body["interval_seconds"] == "soon"
    assert "cron" not in body
    assert "timezone" not in body
    assert "exclude" not in body
    body = schedule_request({"target": "h", "timing": "interval", "interval_seconds": "120"})
    assert ScheduleCreate.model_validate(body).interval_seconds == 120


def test_the_webhook_form_keeps_every_checked_event_and_drops_empty_filters() -> None:
    form = [
        ("url", " https://alerts.example.com/hook "),
        ("events", "scan.completed"),
        ("events", "ports.changed"),
        ("schedule_id", ""),
        ("target", " "),
    ]
    body = webhook_request(form)
    assert body == {
        "url": "https://alerts.example.com/hook",
        "events": ["scan.completed", "ports.changed"],
    }
    assert WebhookCreate.model_validate(body).events == ["scan.completed", "ports.changed"]


def schedule(target: str, next_run_at: str | None, *, enabled: bool = True) -> dict[str, Any]:
    return {
        "id": f"id-{target}-{next_run_at}",
        "target": target,
        "enabled": enabled,
        "next_run_at": next_run_at,
    }


def test_each_target_shows_its_soonest_active_schedule() -> None:
    scans = [
        {
            "task_id": "t1",
            "target": "10.0.0.1",
            "state": "completed",
            "open_ports": 2,
            "created_at": "2026-12-01T10:00:00Z",
        }
    ]
    schedules = [
        schedule("10.0.0.1", "2026-12-03T01:30:00Z"),
        schedule("10.0.0.1", "2026-12-02T23:00:00Z"),
        schedule("10.0.0.1", "2026-12-02T20:00:00Z", enabled=False),
        schedule("10.0.0.2", "2026-12-04T00:00:00Z"),
        schedule("10.0.0.3", None),
    ]
    entries = {entry["target"]: entry for entry in by_target(scans, schedules)}
    assert entries["10.0.0.1"]["next"]["next_run_at"] == "2026-12-02T23:00:00Z"
    assert entries["10.0.0.1"]["scans"] == 1
    assert entries["10.0.0.2"]["last"] is None
    assert entries["10.0.0.2"]["next"]["next_run_at"] == "2026-12-04T00:00:00Z"
    assert "10.0.0.3" not in entries
