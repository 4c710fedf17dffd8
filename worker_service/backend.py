"""Celery's Redis result backend, with a task's last writes riding on its final state.

A scan ends with two Redis writes: Celery stores the task's final state (a GET to check that no
SUCCESS is there yet, then SETEX and PUBLISH), and the scan appends its ``end`` event and gives
its key's active-scan slot back. Here they share one round trip: the scan hands its writes to
:meth:`ScanResultBackend.ride`, and the final state's MULTI/EXEC carries them. Readers of the
event stream then never see ``end`` before the state it announces.

A SUCCESS carrying a rider skips Celery's GET: the only SUCCESS already there can be this
scan's own (a redelivered scan that had finished returns the stored result), and writing it
again only renews its expiry. Like that GET, the write is tried once: while Redis is away a
finishing scan fails fast instead of waiting out the backend's retries.

A rider that no SUCCESS carried (the store failed, or nothing was stored) is sent on its own by
:meth:`ScanResultBackend.settle`, which the task's postrun calls; if Redis is away then too, the
limiter's deadline frees the slot and stream readers fall back to PostgreSQL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.client import Pipeline

log = logging.getLogger(__name__)

Rider = Callable[[Pipeline, str], object]
"""Adds a task's last writes to the pipeline that stores its final state (given here)."""


class ScanResultBackend(RedisBackend):
    # Celery's own, which celery-types does not declare.
    expires: float | None
    _get_result_meta: Callable[..., dict[str, Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._riders: dict[str, Rider] = {}

    def ride(self, task_id: str, rider: Rider) -> None:
        """Send ``rider``'s writes with the task's SUCCESS, which is about to be stored."""
        self._riders[task_id] = rider

    def settle(self, task_id: str, state: str) -> None:
        """Send the task's rider if no SUCCESS carried it; never raises."""
        rider = self._riders.pop(task_id, None)
        if rider is None:
            return
        try:
            self.ensure(self._write, (None, None, rider, state), max_retries=0)
        except Exception as exc:  # Redis away: see the module's docstring
            log.warning("task %s: end event and slot release not written: %r", task_id, exc)

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        rider = self._riders.get(task_id) if state == states.SUCCESS else None
        if rider is None:
            base = super()._store_result  # type: ignore[misc]  # not in celery-types
            return base(task_id, result, state, traceback, request, **kwargs)
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state)
        key = self.get_key_for_task(task_id)
        self.ensure(self._write, (key, value, rider, state), max_retries=0)
        del self._riders[task_id]  # only once carried: on an error, settle() sends it
        return result

    def _write(self, key: bytes | None, value: Any, rider: Rider, state: str) -> None:
        with self.client.pipeline() as pipe:
            if key is not None:
                pipe.set(key, value, ex=int(self.expires) if self.expires else None)
                pipe.publish(key, value)
            rider(pipe, state)
            pipe.execute()
