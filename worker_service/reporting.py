"""What a running scan tells the world: PROGRESS states, and a Redis stream of its events."""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from functools import partial
from typing import Any

import redis
from redis.client import Pipeline
from redis.exceptions import RedisError

from shared.redis_keys import active_key, events_key
from shared.scan_events import STREAM_MAXLEN, EventKind, encode_event
from shared.schemas import ScanProgress
from worker_service.probe.runner import ScanProgressEvent

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 0.25
REDIS_BACKOFF = 5.0
"""Seconds progress writes are skipped after Redis failed: scans go on without it."""


class RedisGate:
    """Whether Redis is worth a try: after a failure, writes are skipped for ``REDIS_BACKOFF``
    seconds. One per process, shared by its scans' event logs: a Redis that hangs then costs
    the process one socket timeout per backoff, not one per scan and write."""

    def __init__(self) -> None:
        self.down_until = 0.0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    def failed(self) -> None:
        self.down_until = time.monotonic() + REDIS_BACKOFF

    def answered(self) -> None:
        """A write went through: Redis is back, progress need not wait out the backoff."""
        self.down_until = 0.0


class EventLog:
    """Writes to one scan's event stream; a Redis outage costs progress, never the scan.

    With a ``writer`` (the threads pool's one Redis thread), what the event loop asks of Redis
    goes through :meth:`post`: the loop, shared by every scan of the process, never waits on
    Redis, and one scan's writes keep their order. :meth:`hold` and :meth:`hold_slot` post
    themselves; :meth:`write` and :meth:`add_to` run where they are called, so from a posted
    call (or anywhere without a writer)."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str,
        task_id: str,
        ttl: int,
        writer: Executor | None = None,
        gate: RedisGate | None = None,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.key = events_key(prefix, task_id)
        self.task_id = task_id
        self.ttl = ttl
        self.writer = writer
        self.gate = gate if gate is not None else RedisGate()
        self._held: list[tuple[EventKind, object]] = []
        self._latest_lock = threading.Lock()
        self._latest: Callable[[], object] | None = None

    @property
    def available(self) -> bool:
        return self.gate.available

    def post(self, call: Callable[[], object]) -> None:
        """Run ``call`` now, or with a writer on its thread, after every call posted before."""
        if self.writer is None:
            call()
            return
        try:
            self.writer.submit(contextvars.copy_context().run, self._logged, call)
        except RuntimeError:  # the writer is shut down: the process is stopping
            log.warning("scan %s: Redis write dropped, the worker is stopping", self.task_id)

    def post_latest(self, call: Callable[[], object]) -> None:
        """:meth:`post` for progress, of which only the newest matters: a call still waiting
        for the writer when another comes is replaced by it, so a slow Redis never lets a
        scan's progress writes pile up."""
        if self.writer is None:
            call()
            return
        with self._latest_lock:
            waiting = self._latest is not None
            self._latest = call
        if not waiting:
            self.post(self._run_latest)

    def _run_latest(self) -> None:
        with self._latest_lock:
            call, self._latest = self._latest, None
        if call is not None:
            call()

    def _logged(self, call: Callable[[], object]) -> None:
        try:
            call()
        except Exception:  # a bug: the writer thread must serve the other scans on
            log.exception("scan %s: a Redis write failed", self.task_id)

    def hold(self, *events: tuple[EventKind, object]) -> None:
        """Queue events to go out ahead of the next write (a scan always writes its ``end``)."""
        self.post(partial(self._held.extend, events))

    def write(self, *events: tuple[EventKind, object], release: Any = None) -> bool:
        """Append events (after any held ones); with ``release``, also free that key's
        active-scan slot taken by the gateway's limiter, in the same round trip."""
        if not self.available:
            if release is not None:
                self._release(release)
            return False
        try:
            with self.client.pipeline(transaction=False) as pipe:
                self.add_to(pipe, *events, release=release)
                pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("scan %s: progress not written, Redis unavailable: %r", self.task_id, exc)
            self.gate.failed()
            if release is not None:
                self._release(release)  # its own chance: the pipeline may have failed before it
            return False
        self.gate.answered()
        self._held.clear()
        return True

    def add_to(
        self, pipe: Pipeline, *events: tuple[EventKind, object], release: Any = None
    ) -> None:
        """Queue on ``pipe`` what :meth:`write` sends: held events, ``events``, the release."""
        for kind, data in (*self._held, *events):
            pipe.xadd(self.key, encode_event(kind, data), maxlen=STREAM_MAXLEN)  # type: ignore[arg-type]
        pipe.expire(self.key, self.ttl)
        if release is not None:
            pipe.zrem(active_key(self.prefix, release), self.task_id)

    def hold_slot(self, owner: Any, seconds: float) -> None:
        """Count the key's active-scan slot from now, the scan's start: a slot the gateway took
        lives while the scan is queued, however long, and then ``seconds`` from its start. A
        slot already released (the scan was cancelled) is not taken again."""
        self.post(partial(self._hold_slot, owner, seconds))

    def _hold_slot(self, owner: Any, seconds: float) -> None:
        # Not skipped while the gate is down: a slot left at the gateway's expiry (the result
        # TTL) would hold the key's capacity for a day if the final release failed too.
        try:
            self.client.zadd(
                active_key(self.prefix, owner), {self.task_id: time.time() + seconds}, xx=True
            )
        except (RedisError, OSError) as exc:
            log.warning("scan %s: active slot not renewed: %r", self.task_id, exc)
            self.gate.failed()
            return
        self.gate.answered()

    def _release(self, owner: Any) -> None:
        try:
            self.client.zrem(active_key(self.prefix, owner), self.task_id)
        except (RedisError, OSError) as exc:
            log.warning("scan %s: active slot not released: %r", self.task_id, exc)


class ProgressReporter:
    """Turns engine events into PROGRESS states and stream events, a few per second at most.

    Nothing is reported in the first ``PROGRESS_INTERVAL``, tier changes included: a scan that
    ends by then costs no PROGRESS write at all. Open ports found meanwhile still get their
    ``port`` events, sent with the next write (at the latest with the scan's ``end``).
    """

    def __init__(
        self, events: EventLog, update_state: Callable[[ScanProgress], None], total: int
    ) -> None:
        self.events = events
        self.update_state = update_state
        self.total = total
        self.started = self.last_sent = time.monotonic()
        self.last_tier: str | None = None
        self.base = 0
        self.last_percent = 0
        self.address = ""
        self.open_ports: list[tuple[str, int]] = []
        self._announced = 0

    def start_host(self, address: str) -> None:
        self.address = address

    def finish_host(self, ports_scanned: int) -> None:
        self.base += ports_scanned

    def _quiet(self, now: float) -> bool:
        return now - self.started < PROGRESS_INTERVAL

    def _hold_fresh_ports(self) -> None:
        fresh = self.open_ports[self._announced :]
        self.events.hold(*(("port", {"port": p, "address": a, "state": "open"}) for a, p in fresh))
        self._announced = len(self.open_ports)

    def _send(self, progress: ScanProgress) -> None:
        self.events.post_latest(partial(self._deliver, progress))

    def _deliver(self, progress: ScanProgress) -> None:
        if self.events.write(("progress", progress.model_dump(mode="json"))):
            self.update_state(progress)

    def announce(self, status: str, tier: str) -> None:
        """A progress update outside port sweeping, such as service identification."""
        now = time.monotonic()
        self.last_tier = tier
        self._hold_fresh_ports()
        if self._quiet(now):
            return
        self.last_sent = now
        self._send(
            ScanProgress(
                status=status,
                progress=self.last_percent,
                tier=tier,
                ports_scanned=self.base,
                total_ports=self.total,
                open_ports=[port for _, port in self.open_ports],
            )
        )

    def __call__(self, event: ScanProgressEvent) -> None:
        known = {port for addr, port in self.open_ports if addr == self.address}
        self.open_ports.extend((self.address, p) for p in event.open_ports if p not in known)
        self._hold_fresh_ports()
        now = time.monotonic()
        if self._quiet(now) or (
            event.tier == self.last_tier and now - self.last_sent < PROGRESS_INTERVAL
        ):
            self.last_tier = event.tier
            return
        self.last_tier = event.tier
        self.last_sent = now
        done = self.base + event.ports_scanned
        self.last_percent = min(99, done * 100 // self.total) if self.total else 0
        self._send(
            ScanProgress(
                status=f"Scanning {event.tier} priority ports",
                progress=self.last_percent,
                tier=event.tier,
                ports_scanned=done,
                total_ports=self.total,
                open_ports=[port for _, port in self.open_ports],
            )
        )
