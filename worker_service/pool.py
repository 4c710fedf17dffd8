"""Celery's pool as this worker runs it: prefork, or threads on one shared event loop.

``CYBERSEC_WORKER_POOL`` picks it (``make_celery`` sets ``worker_pool``); a ``--pool`` given on
the command line wins, and :func:`settle_pool` then makes the settings the tasks read say what
Celery really runs, so the runtime never runs its loop from several threads in prefork mode.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from celery import concurrency
from celery.concurrency.thread import TaskPool as CeleryThreadsPool

from worker_service.runtime import close_runtime, current_runtime


class ThreadsPool(CeleryThreadsPool):
    """Celery's threads pool, able to cancel running requests.

    Celery cancels the requests it has not acked at the end of a soft shutdown, when the broker
    connection is lost, and on ``revoke --terminate``, through ``terminate_job(pid)`` (a
    prefork child is killed; the stock threads pool has none and raises). Here it abandons the
    delivery on the runtime's loop: the task then hands its message back (``Abandoned``). A pid
    names the whole process, so ``GuardedRequest`` names its own request with :meth:`only`;
    a call without one abandons every delivery of the process. The runtime (loop, pools,
    executors) is closed with the pool."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._target = threading.local()

    @contextlib.contextmanager
    def only(self, task_id: str) -> Iterator[None]:
        """Within: :meth:`terminate_job` (on this thread) ends the request ``task_id`` alone."""
        self._target.task_id = task_id
        try:
            yield
        finally:
            self._target.task_id = None

    def terminate_job(self, pid: Any, signal: Any = None) -> None:
        runtime = current_runtime()
        if runtime is not None:
            runtime.abandon(getattr(self._target, "task_id", None))

    def on_stop(self) -> None:
        super().on_stop()  # returns once every task thread has ended
        close_runtime()

    def on_terminate(self) -> None:
        close_runtime()


def settle_pool(sender: Any = None, **_: Any) -> None:
    """Connected to ``worker_init``: any threads pool becomes :class:`ThreadsPool`, and the
    app's settings take the pool kind and concurrency Celery runs with."""
    app = sender.app
    settings = app.conf.get("cybersec_settings")
    if settings is None:  # another app's worker
        return
    pool = concurrency.get_implementation(sender.pool_cls)
    threads = isinstance(pool, type) and issubclass(pool, CeleryThreadsPool)
    if threads:
        sender.pool_cls = ThreadsPool
    update: dict[str, Any] = {"worker_pool": "threads" if threads else "prefork"}
    if isinstance(sender.concurrency, int) and sender.concurrency > 0:
        update["worker_concurrency"] = sender.concurrency
    app.conf.cybersec_settings = settings.model_copy(update=update)
