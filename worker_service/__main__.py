"""``python -m worker_service [celery worker options]``: a Celery worker on the scan queue."""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> None:
    # SIGTERM means Celery's soft shutdown (finish within the bound, then requeue), not a warm
    # shutdown that waits forever. billiard reads this when imported, so set it first.
    os.environ.setdefault("REMAP_SIGTERM", "SIGQUIT")
    from shared.settings import load_settings
    from worker_service.app import create_worker_app

    settings = load_settings()
    app = create_worker_app(settings)
    args = sys.argv[1:] if argv is None else argv
    if not any(a in ("-n", "--hostname") or a.startswith("--hostname=") for a in args):
        # Node names must be unique per broker (each owns an exclusive pidbox queue); two
        # workers on one host would otherwise both be celery@host.
        args = [f"--hostname={settings.queue_prefix}-{os.getpid()}@%h", *args]
    app.worker_main(["worker", f"--loglevel={settings.log_level}", *args])


if __name__ == "__main__":
    main()
