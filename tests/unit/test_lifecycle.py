"""A delivery's outcome and its one finish(), with fakes: no Celery, no services, no network."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, cast
from uuid import UUID, uuid4

import pytest
import redis

from shared.policy import TargetPolicy
from shared.schemas import ScanConfig, ScanProgress, ScanResult, ScanTaskPayload
from shared.settings import Settings
from shared.store import ScanRow, ScanStore, ShardRow
from tests.support.lifecycle import NOW
from tests.support.lifecycle import scan_result as result
from worker_service.job import deliver_scan
from worker_service.lifecycle import (
    Cancelled,
    Completed,
    Delivery,
    Failed,
    Outcome,
    Requeue,
    RetryLater,
    Sharded,
    Skipped,
    Write,
    finish,
)
from worker_service.reporting import EventLog
from worker_service.sharding import DuplicateMerge, Recorded, deliver_merge, deliver_shard


class FakeStore:
    """Records the store calls finish() and deliver_scan() make."""

    def __init__(self, row: ScanRow | None = None, *, down: bool = False) -> None:
        self.row = row
        self.down = down
        self.calls: list[tuple[str, Any]] = []
        self.pending: list[ShardRow] = []

    def __getattr__(self, name: str) -> Callable[..., Awaitable[bool]]:
        async def call(*args: Any) -> bool:
            self.calls.append((name, args))
            return self.ends_scan  # for the writes that end a scan: whether this one did

        return call

    async def mark_running(self, scan_id: UUID, reap: float | None = None) -> ScanRow | None:
        if self.down:
            raise ConnectionRefusedError("database away")
        self.calls.append(("mark_running", (scan_id, reap)))
        return self.row

    async def start_shards(self, *args: Any) -> list[ShardRow]:
        self.calls.append(("start_shards", args))
        return self.pending

    async def complete(self, result: ScanResult) -> bool:
        self.calls.append(("complete", (result,)))
        return self.ends_scan

    ends_scan = True
    """What ``complete`` answers: whether this result ended the scan."""

    async def should_stop(self, scan_id: UUID) -> bool:
        return False


@dataclass
class FakeEnding:
    store: FakeStore
    task_id: UUID = field(default_factory=uuid4)
    reap_seconds: float = 600.0
    lands: bool = True
    ended: list[tuple[str, Any]] = field(default_factory=list)
    counted: list[Outcome] = field(default_factory=list)
    stored_early: list[ScanResult] = field(default_factory=list)

    async def write(self, call: Write) -> bool:
        if not self.lands:
            return False
        await call(cast(ScanStore, self.store))
        return True

    def storing(self, result: ScanResult) -> None:
        self.stored_early.append(result)

    def end(self, state: str, meta: dict[str, Any] | str | None) -> None:
        self.ended.append((state, meta))

    def count(self, outcome: Outcome) -> None:
        self.counted.append(outcome)


def names(store: FakeStore) -> list[str]:
    return [name for name, _ in store.calls]


async def test_a_completed_scan_is_stored_then_ended_with_its_result() -> None:
    ending = FakeEnding(FakeStore())
    done = Completed(result(uuid4()))
    assert await finish(done, ending) == done
    assert names(ending.store) == ["complete"]
    assert ending.ended == [("SUCCESS", done.result.model_dump(mode="json"))]
    assert ending.counted == [done]


async def test_a_result_for_a_scan_that_had_ended_is_neither_announced_nor_counted() -> None:
    """A late merge of a scan a shard failed, or a second result: one end event, one metric."""
    store = FakeStore()
    store.ends_scan = False
    ending = FakeEnding(store)
    done = Completed(result(uuid4()))
    assert await finish(done, ending) == done
    assert names(store) == ["complete"]
    assert ending.ended == []
    assert ending.counted == []


async def test_a_failure_or_cancel_of_a_scan_that_had_ended_is_not_announced_again() -> None:
    """Two shards failing the same scan, a cancel after the reaper: one end, one metric."""
    partial = result(uuid4(), "revoked")
    for outcome in (Failed("shard 1: boom"), Cancelled(partial)):
        store = FakeStore()
        store.ends_scan = False
        ending = FakeEnding(store)
        assert await finish(outcome, ending) == outcome
        assert len(store.calls) == 1
        assert ending.ended == []
        assert ending.counted == []


async def test_a_result_the_database_never_took_is_retried_not_announced() -> None:
    ending = FakeEnding(FakeStore(), lands=False)
    outcome = await finish(Completed(result(uuid4())), ending)
    assert isinstance(outcome, RetryLater)
    assert ending.ended == []
    assert ending.counted == [outcome]


async def test_cancelled_failed_and_skipped_end_with_their_state() -> None:
    partial = result(uuid4(), "revoked")
    cases: list[tuple[Outcome, list[str], tuple[str, Any]]] = [
        (Cancelled(partial), ["revoke"], ("REVOKED", partial.model_dump(mode="json"))),
        (
            Failed("time limit exceeded (5 s)"),
            ["fail_by_task"],
            ("FAILURE", "time limit exceeded (5 s)"),
        ),
        (Skipped("revoked"), [], ("REVOKED", None)),
        (Skipped("failed"), [], ("FAILURE", None)),
    ]
    for outcome, writes, end in cases:
        ending = FakeEnding(FakeStore())
        assert await finish(outcome, ending) == outcome
        assert names(ending.store) == writes
        assert ending.ended == [end]


async def test_a_failure_is_ended_even_when_the_database_is_away() -> None:
    """The row is then the reaper's; clients still learn the reason from Redis."""
    ending = FakeEnding(FakeStore(), lands=False)
    await finish(Failed("boom"), ending)
    assert ending.ended == [("FAILURE", "boom")]


async def test_retries_and_requeues_are_counted_as_orderly_not_as_lost_workers() -> None:
    for outcome in (RetryLater("db away"), Requeue("shutting down")):
        ending = FakeEnding(FakeStore())
        await finish(outcome, ending)
        assert ending.store.calls == [("release", (ending.task_id, 600.0))]
        assert ending.ended == []


async def test_a_sharded_scan_ends_elsewhere() -> None:
    ending = FakeEnding(FakeStore())
    await finish(Sharded(3, 300), ending)
    assert ending.store.calls == []
    assert ending.ended == []


# --- deliver_scan: what a delivery comes to ------------------------------------------------


@dataclass
class FakeRuntime:
    fake: FakeStore
    settings: Settings = field(
        default_factory=lambda: Settings(db_retry_seconds=1, shard_min_ports=40, max_shards=4)
    )
    policy: TargetPolicy = field(
        default_factory=lambda: TargetPolicy(("127.0.0.0/8",), ("127.0.0.66",))
    )
    lookups: asyncio.Semaphore | None = None

    async def store(self) -> ScanStore:
        return cast(ScanStore, self.fake)

    def redis(self) -> redis.Redis:
        raise AssertionError("not used")


def job(target: str = "127.0.0.1", ports: str = "1") -> ScanTaskPayload:
    return ScanTaskPayload(
        scan_id=uuid4(), target=target, ports=ports, config=ScanConfig(), priority="normal"
    )


def row_of(payload: ScanTaskPayload, **changes: Any) -> ScanRow:
    row = ScanRow(
        id=payload.scan_id,
        task_id=uuid4(),
        target=payload.target,
        ports=payload.ports,
        config=payload.config,
        priority="normal",
        state="running",
        progress=0,
        created_at=NOW,
        started_at=NOW,
        finished_at=None,
        result=None,
        error=None,
        attempts=1,
        api_key_id=None,
        cancel_requested=False,
    )
    return replace(row, **changes)


async def deliver(
    payload: ScanTaskPayload, store: FakeStore, *, retries: int = 0, soft: float = 60
) -> Outcome:
    events = cast(EventLog, None)  # a delivery that probes nothing writes no event

    def progress(_: ScanProgress) -> None:
        raise AssertionError("no progress expected")

    delivery = Delivery("task", retries, soft, soft + 30)
    outcome, _row = await deliver_scan(FakeRuntime(store), delivery, payload, events, progress)
    return outcome


async def test_a_scan_never_accepted_fails() -> None:
    outcome = await deliver(job(), FakeStore(None))
    assert isinstance(outcome, Failed)
    assert "never accepted" in outcome.reason


@pytest.mark.parametrize(
    ("attempts", "released", "poison"),
    [(6, 0, True), (6, 1, False), (9, 3, True), (8, 3, False), (5, 0, False)],
)
async def test_the_poison_guard_counts_only_lost_deliveries(
    attempts: int, released: int, poison: bool
) -> None:
    """Five deliveries that ended with their worker gone, whatever retries came between."""
    payload = job()
    outcome = await deliver(
        payload, FakeStore(row_of(payload, attempts=attempts, released=released))
    )
    if poison:
        assert isinstance(outcome, Failed)
        assert outcome.dead_letter
    else:
        assert not isinstance(outcome, Failed), outcome


async def test_a_scan_that_ended_before_this_delivery_is_skipped_or_returned() -> None:
    payload = job()
    assert await deliver(payload, FakeStore(row_of(payload, state="revoked"))) == Skipped("revoked")
    done = result(payload.scan_id)
    outcome = await deliver(payload, FakeStore(row_of(payload, state="completed", result=done)))
    assert outcome == Completed(done)


async def test_a_scan_cancelled_while_it_ran_nowhere_probes_nothing() -> None:
    payload = job()
    outcome = await deliver(payload, FakeStore(row_of(payload, cancel_requested=True)))
    assert isinstance(outcome, Cancelled)
    assert outcome.partial.total_ports_scanned == 0


async def test_a_target_denied_by_the_worker_fails_with_the_reason() -> None:
    payload = job(target="127.0.0.66")
    outcome = await deliver(payload, FakeStore(row_of(payload)))
    assert isinstance(outcome, Failed)
    assert not outcome.dead_letter
    assert "127.0.0.66" in outcome.reason


async def test_a_large_scan_is_recorded_as_shards_and_handed_on() -> None:
    payload = job(ports="1-200")
    store = FakeStore(row_of(payload))
    outcome = await deliver(payload, store)
    assert isinstance(outcome, Sharded)
    assert (outcome.shards, outcome.probes) == (4, 200)
    assert names(store) == ["mark_running", "start_shards"]


async def test_a_database_away_before_the_start_retries_then_requeues() -> None:
    """Never dropped: once Celery's retries are spent, the message goes back to the queue."""
    payload = job()
    first = await deliver(payload, FakeStore(down=True), soft=0.2)
    assert isinstance(first, RetryLater)
    last = await deliver(payload, FakeStore(down=True), retries=3, soft=0.2)
    assert isinstance(last, Requeue)


async def test_a_redelivered_sharded_scan_publishes_its_unfinished_shards_again() -> None:
    """Shard rows are written before any shard is published: a worker lost in between leaves
    a redelivery that finds them and publishes those with no outcome (the chord's marker, set
    before publishing, lost the scan instead)."""
    payload = job(ports="1-200")
    store = FakeStore(row_of(payload, shards_total=4, addresses=("127.0.0.1",)))
    unfinished = ShardRow(payload.scan_id, 2, ("127.0.0.1",), "101-150", 0, 0, None, None, None)
    store.pending = [unfinished]
    outcome = await deliver(payload, store)
    assert isinstance(outcome, Sharded)
    assert outcome.pending == (unfinished,)
    assert (outcome.shards, outcome.probes) == (4, 200)
    assert names(store) == ["mark_running", "start_shards"]


class ShardStore(FakeStore):
    def __init__(self, shard: ShardRow, row: ScanRow) -> None:
        super().__init__(row)
        self.shard = shard

    async def shard_started(
        self, scan_id: UUID, index: int, reap: float
    ) -> tuple[ShardRow, ScanRow] | None:
        assert self.row is not None
        return self.shard, self.row

    async def record_shard(self, *args: Any) -> bool:
        self.calls.append(("record_shard", args))
        return False


async def deliver_a_shard(store: ShardStore, payload: ScanTaskPayload) -> Any:
    def progress(_: ScanProgress) -> None:
        raise AssertionError("no progress expected")

    events = cast(EventLog, None)
    delivery = Delivery("shard-task", 0, 60, 90)
    outcome, _row = await deliver_shard(FakeRuntime(store), delivery, payload, 0, events, progress)
    return outcome


def shard_of(payload: ScanTaskPayload, address: str, **changes: Any) -> ShardRow:
    shard = ShardRow(payload.scan_id, 0, (address,), "1-10", 1, 0, None, None, None)
    return replace(shard, **changes)


async def test_a_shard_rechecks_the_target_policy_and_fails_the_scan() -> None:
    payload = job(target="127.0.0.64/28", ports="1-10")
    store = ShardStore(shard_of(payload, "127.0.0.66"), row_of(payload))
    outcome = await deliver_a_shard(store, payload)
    assert isinstance(outcome, Failed)
    assert outcome.reason.startswith("shard 0: ")
    assert "127.0.0.66" in outcome.reason
    [(name, args)] = store.calls
    assert (name, args[2]) == ("record_shard", "failed")


async def test_a_shard_of_a_cancelled_scan_probes_nothing() -> None:
    payload = job(ports="1-10")
    row = row_of(payload, cancel_requested=True)
    store = ShardStore(shard_of(payload, "127.0.0.1"), row)
    assert isinstance(await deliver_a_shard(store, payload), Recorded)
    [(name, args)] = store.calls
    assert (name, args[2], args[3]["scanned"]) == ("record_shard", "cancelled", 0)


async def test_a_shard_lost_five_times_is_dead_lettered() -> None:
    payload = job(ports="1-10")
    store = ShardStore(shard_of(payload, "127.0.0.1", attempts=6), row_of(payload))
    outcome = await deliver_a_shard(store, payload)
    assert isinstance(outcome, Failed)
    assert outcome.dead_letter
    assert store.calls == []


class LostReplyStore(ShardStore):
    """Records the scan's last shard like the real store, then loses the reply once: the
    commit landed, the caller sees ConnectionResetError and retries."""

    def __init__(self, shard: ShardRow, row: ScanRow) -> None:
        super().__init__(shard, row)
        self.recorded: set[int] = set()
        self.lost = False

    async def record_shard(self, scan_id: UUID, index: int, *args: Any) -> bool:
        assert self.row is not None
        self.calls.append(("record_shard", (scan_id, index, *args)))
        if index not in self.recorded:
            self.recorded.add(index)
            self.row = replace(self.row, shards_done=self.row.shards_done + 1)
            if not self.lost:
                self.lost = True
                raise ConnectionResetError("reply lost after the commit")
        return self.row.state == "running" and self.row.shards_done == self.row.shards_total


async def test_a_last_shard_whose_commit_reply_was_lost_still_has_the_merge_published() -> None:
    payload = job(ports="1-10")
    row = row_of(payload, cancel_requested=True, shards_total=2, shards_done=1)
    store = LostReplyStore(shard_of(payload, "127.0.0.1"), row)
    outcome = await deliver_a_shard(store, payload)
    assert outcome == Recorded(merge=True)
    assert names(store) == ["record_shard", "record_shard"]


class MergeStore(FakeStore):
    def __init__(self, row: ScanRow, *, claimed: bool = True) -> None:
        super().__init__(row)
        self.claimed = claimed

    async def merge_started(
        self, scan_id: UUID, task_id: str, reap: float
    ) -> tuple[ScanRow, bool] | None:
        assert self.row is not None
        self.calls.append(("merge_started", (scan_id, task_id)))
        return self.row, self.claimed

    async def shards(self, scan_id: UUID) -> list[ShardRow]:
        return []


async def deliver_a_merge(store: MergeStore, payload: ScanTaskPayload) -> Any:
    delivery = Delivery("merge-task", 0, 60, 90)
    outcome, _row = await deliver_merge(FakeRuntime(store), delivery, payload)
    return outcome


async def test_a_second_merge_message_finds_the_merge_claimed_and_does_nothing() -> None:
    payload = job(ports="1-10")
    row = row_of(payload, shards_total=0, merge_attempts=1, merge_task="first-merge")
    store = MergeStore(row, claimed=False)
    assert await deliver_a_merge(store, payload) == DuplicateMerge("first-merge")
    assert names(store) == ["merge_started"]


@pytest.mark.parametrize(
    ("attempts", "released", "poison"), [(6, 0, True), (6, 1, False), (9, 3, True)]
)
async def test_the_merge_poison_guard_counts_only_its_own_lost_deliveries(
    attempts: int, released: int, poison: bool
) -> None:
    """A merge retried while the database was away is not poison: its retries are released
    on its own counter, not the scan's."""
    payload = job(ports="1-10")
    row = row_of(payload, shards_total=0, merge_attempts=attempts, merge_released=released)
    outcome = await deliver_a_merge(MergeStore(row), payload)
    assert isinstance(outcome, Failed) == poison, outcome
