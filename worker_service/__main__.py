"""``python -m worker_service [--critical] [celery worker options]``: a Celery worker.

Without ``--critical``: the node consumes the scan queue and the critical queue with
``CYBERSEC_WORKER_CONCURRENCY`` processes. With ``--critical``: the reserved node, which consumes
only the critical queue with ``CYBERSEC_CRITICAL_CONCURRENCY`` processes, so a critical scan finds
a free process even while long scans hold every normal one. Run one of each per worker host.

With ``CYBERSEC_WORKER_POOL=threads`` either node is one process running that many scans at
once (``--pool=threads``), on one event loop; see ``worker_service.runtime``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.settings import Settings

CRITICAL_FLAG = "--critical"


def _metrics_directory() -> str:
    """A directory for this worker's metric samples, removed when the main process exits."""
    path = tempfile.mkdtemp(prefix="cybersec-worker-metrics-")
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # not a forked child that happens to exit normally
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


def _keep_our_logging(**_: Any) -> None:
    """Connected to Celery's ``setup_logging``: Celery then installs no handler of its own."""


def critical_node(settings: Settings) -> tuple[Settings, list[str]]:
    """The reserved node's settings (own heartbeat file and metrics port, so it runs beside a
    normal node on one host) and the worker options that bind it to the critical queue."""
    node = settings.model_copy(
        update={
            "worker_concurrency": settings.critical_concurrency,
            "heartbeat_file": f"{settings.heartbeat_file}.critical",
            "metrics_port": settings.critical_metrics_port,
        }
    )
    options = [
        f"--queues={settings.critical_queue}",
        f"--concurrency={settings.critical_concurrency}",
        f"--hostname={settings.queue_prefix}-critical-{os.getpid()}@%h",
    ]
    return node, options


def main(argv: list[str] | None = None) -> None:
    # SIGTERM means Celery's soft shutdown (finish within the bound, then requeue), not a warm
    # shutdown that waits forever. billiard reads this when imported, so set it first.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from shared.logging import configure_logging
    from shared.settings import load_settings

    settings = load_settings()
    args = sys.argv[1:] if argv is None else list(argv)
    if CRITICAL_FLAG in args:
        args.remove(CRITICAL_FLAG)
        settings, options = critical_node(settings)
        args = [*options, *args]
    if settings.worker_pool == "threads":
        args = ["--pool=threads", f"--concurrency={settings.worker_concurrency}", *args]
    configure_logging(settings.log_level, "worker", settings.log_format)
    if settings.metrics_port:
        # Every prefork child (or the one threads-pool process) writes its samples there.
        # prometheus_client picks multiprocess mode when first imported, so this comes
        # before the worker's modules are loaded.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_directory()
    from celery.signals import setup_logging

    from worker_service.app import create_worker_app

    setup_logging.connect(_keep_our_logging, weak=False)
    app = create_worker_app(settings)
    if not any(a in ("-n", "--hostname") or a.startswith("--hostname=") for a in args):
        # Node names must be unique per broker (each owns an exclusive pidbox queue); two
        # workers on one host would otherwise both be celery@host.
        args = [f"--hostname={settings.queue_prefix}-{os.getpid()}@%h", *args]
    banner = ["--quiet"] if settings.log_format == "json" else []  # no banner among JSON lines
    app.worker_main([*banner, "worker", f"--loglevel={settings.log_level}", *args])


if __name__ == "__main__":
    main()
