"""Celery's Redis result backend, with a task's last writes riding on its final state.

A scan ends with two Redis writes: Celery stores the task's final state (a GET to check that no
SUCCESS is there yet, then SETEX and PUBLISH), and the scan appends its ``end`` event and gives
its key's active-scan slot back. Here they share one round trip: the scan hands its writes to
:meth:`ScanResultBackend.ride`, and the final state's MULTI/EXEC carries them. Readers of the
event stream then never see ``end`` before the state it announces.

A SUCCESS carrying a rider skips Celery's GET: the only SUCCESS already there can be this
scan's own (a redelivered scan that had finished returns the stored result), and writing the
same SUCCESS again changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str
from redis.client import Pipeline

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
        """Send ``rider``'s writes with the task's final state, which is about to be stored."""
        self._riders[task_id] = rider

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        rider = self._riders.pop(task_id, None) if state in states.READY_STATES else None
        if rider is None or state != states.SUCCESS:
            base = super()._store_result  # type: ignore[misc]  # not in celery-types
            stored = base(task_id, result, state, traceback, request, **kwargs)
            if rider is not None:
                # Not expected (a rider is handed over just before its task returns), but a
                # rider is never dropped: its writes follow Celery's, in their own round trip.
                self.ensure(self._write, (None, None, rider, state))
            return stored
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError("value too large for Redis backend", state=state)
        self.ensure(self._write, (self.get_key_for_task(task_id), value, rider, state))
        return result

    def _write(self, key: bytes | None, value: Any, rider: Rider, state: str) -> None:
        with self.client.pipeline() as pipe:
            if key is not None:
                if self.expires:
                    pipe.setex(key, self.expires, value)
                else:
                    pipe.set(key, value)
                pipe.publish(key, value)
            rider(pipe, state)
            pipe.execute()
