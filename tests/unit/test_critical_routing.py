"""Critical scans go to their own queue, which a reserved worker node consumes (issue 15, 7)."""

from __future__ import annotations

from shared.protocol import PRIORITIES, queue_arguments, queue_for
from shared.settings import Settings
from worker_service.__main__ import critical_node
from worker_service.celery_app import make_celery


def test_only_critical_priority_is_routed_to_the_critical_queue() -> None:
    routes = {
        name: queue_for(level, "p.scans", "p.scans.critical") for name, level in PRIORITIES.items()
    }
    assert routes == {
        "low": "p.scans",
        "normal": "p.scans",
        "high": "p.scans",
        "critical": "p.scans.critical",
    }


def test_normal_node_consumes_both_queues_with_the_same_arguments() -> None:
    settings = Settings(queue_prefix="acme")
    app = make_celery(settings)
    queues = {q.name: q.queue_arguments for q in app.conf.task_queues}
    expected = queue_arguments("acme.scans.dead")
    assert queues == {"acme.scans": expected, "acme.scans.critical": expected}


def test_critical_node_has_its_own_queue_processes_heartbeat_and_metrics_port() -> None:
    settings = Settings(
        queue_prefix="acme",
        worker_concurrency=8,
        critical_concurrency=2,
        heartbeat_file="/run/w.hb",
        metrics_port=9100,
        critical_metrics_port=9101,
    )
    node, options = critical_node(settings)
    assert node.worker_concurrency == 2
    assert node.heartbeat_file == "/run/w.hb.critical"
    assert node.metrics_port == 9101
    assert "--queues=acme.scans.critical" in options
    assert "--concurrency=2" in options
    assert any(o.startswith("--hostname=acme-critical-") for o in options)
