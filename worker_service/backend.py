"""Celery's Redis result backend, with a scan's last writes in the round trip of its final state.

A scan ends with two kinds of Redis writes: its task's final state (SET and PUBLISH, as Celery
stores it), and its ``end`` event with its key's active-scan slot given back. ``lifecycle.finish``
sends them together through :meth:`ScanResultBackend.finish`, in one MULTI/EXEC: readers of the
event stream then never see ``end`` before the state it announces. The write is tried twice,
at once (the second on a fresh connection, for one a Redis restart closed): while Redis is away
a finishing scan goes on at once (PostgreSQL holds its outcome), the limiter's deadline frees
the slot, and stream readers fall back to PostgreSQL. A ``PROGRESS`` or ``STORING`` never
replaces a settled state (a shard's late progress after its scan's SUCCESS).

In the threads pool these writes go out on one writer thread, in order, and a task may return
before they did (its drain is bounded): the final state it returns is marked at once
(:meth:`ScanResultBackend.will_return`) so Celery does not store it a second time, and a
``STORING`` still queued never replaces a final state stored meanwhile.
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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

from shared.errors import InvalidScan
from shared.protocol import STORING

log = logging.getLogger(__name__)

Rider = Callable[[Pipeline, str], object]
"""Adds a task's last writes to the pipeline that stores its final state (given here)."""
SETTLED = frozenset({*states.READY_STATES, states.RETRY})
"""States a ``STORING`` written later must leave in place."""
PROGRESS_KEEPS = frozenset({*states.READY_STATES, STORING})
"""States a ``PROGRESS`` written later must leave in place: a final one, and ``STORING`` (a
result clients read while PostgreSQL is away). Not ``RETRY``: a retried task's next delivery
reports its progress under the same id."""


def keeps(state: str) -> frozenset[str]:
    """The stored states a write of ``state`` must not replace."""
    if state == STORING:
        return SETTLED
    if state in SETTLED:
        return frozenset()
    return PROGRESS_KEEPS


class ScanResultBackend(RedisBackend):
    # Celery's own, which celery-types does not declare.
    expires: float | None
    _get_result_meta: Callable[..., dict[str, Any]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._written: set[str] = set()

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        if task_id in self._written:
            # The task returned a result that finish() stored already, with its end event.
            self._written.discard(task_id)
            return result
        if state not in SETTLED:
            # PROGRESS: a shard's progress can land after its scan's merge stored SUCCESS (or a
            # cancelled engine's last event after REVOKED); it must not replace that.
            meta = self._get_result_meta(
                result=result, state=state, traceback=traceback, request=request
            )
            meta["task_id"] = bytes_to_str(task_id)
            key = self.get_key_for_task(task_id)
            self.ensure(self._write, (key, self.encode(meta), _no_rider, state), max_retries=0)
            return result
        base = super()._store_result  # type: ignore[misc]  # not in celery-types
        return base(task_id, result, state, traceback, request, **kwargs)

    def will_return(self, task_id: str) -> None:
        """The running task ``task_id`` returns next the result :meth:`finish` stores (whether
        or not that write lands, or has yet): Celery then stores nothing more."""
        self._written.add(task_id)

    def finish(
        self,
        task_id: str,
        state: str,
        result: dict[str, Any] | str | None,
        rider: Rider,
    ) -> bool:
        """Store ``state`` with ``result`` (a result dict, or a failure's reason; None stores
        no state) and ``rider``'s writes in one transaction; False if Redis did not take them.
        A ``STORING`` state is not stored over a settled one (:data:`SETTLED`). Never
        raises."""
        key = value = None
        try:
            if result is not None:
                if state == states.FAILURE:
                    result = self.prepare_exception(InvalidScan(str(result)))
                meta = self._get_result_meta(
                    result=result, state=state, traceback=None, request=None
                )
                meta["task_id"] = bytes_to_str(task_id)
                value = self.encode(meta)
                if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
                    raise BackendStoreError("value too large for Redis backend", state=state)
                key = self.get_key_for_task(task_id)
            try:
                self.ensure(self._write, (key, value, rider, state), max_retries=0)
            except RedisConnectionError:
                # Once more at once: the first write after a Redis restart meets a pooled
                # connection the restart closed, and would lose the end event and slot
                # release. Not after a timeout: a hung Redis would cost the wait twice.
                self.ensure(self._write, (key, value, rider, state), max_retries=0)
        except Exception as exc:  # Redis away: see the module's docstring
            log.warning("task %s: final state and end event not written: %r", task_id, exc)
            return False
        return True

    def _write(self, key: bytes | None, value: Any, rider: Rider, state: str) -> None:
        with self.client.pipeline() as pipe:
            keep = keeps(state)
            if key is not None and keep:
                pipe.watch(key)  # EXEC fails if any other write to the key comes in between
                if self._kept(pipe.get(key), keep):
                    log.info("%r: %s not written over a settled state", key, state)
                    return
                pipe.multi()
            if key is not None:
                pipe.set(key, value, ex=int(self.expires) if self.expires else None)
                pipe.publish(key, value)
            rider(pipe, state)
            try:
                pipe.execute()
            except WatchError:  # only a guarded write watches: the key moved on, leave it
                log.info("%r: %s not written, the task's state changed meanwhile", key, state)

    def _kept(self, stored: Any, keep: frozenset[str]) -> bool:
        if stored is None:
            return False
        meta = self.decode(stored)
        return isinstance(meta, dict) and meta.get("status") in keep


def _no_rider(_pipe: Pipeline, _state: str) -> None:
    """A state written with nothing riding on it."""
