"""How the task layer answers Celery for each outcome, with a fake task: no broker."""

from __future__ import annotations

from typing import Any, cast
from uuid import uuid4

import pytest
from celery import Task
from celery.exceptions import Ignore, Reject, Retry

from tests.support.lifecycle import scan_result as result
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
)
from worker_service.tasks import _answer


class FakeTask:
    def __init__(self, publish_error: Exception | None = None) -> None:
        self.publish_error = publish_error
        self.countdowns: list[float] = []

    def retry(self, *, countdown: float, priority: int | None = None) -> Retry:
        self.countdowns.append(countdown)
        if self.publish_error is not None:
            raise self.publish_error
        return Retry("retrying")


def requeued(rejection: Reject) -> bool:
    return bool(vars(rejection)["requeue"])  # an attribute celery-types does not declare


def answer(outcome: Outcome, task: FakeTask | None = None, retries: int = 0) -> Any:
    fake = cast(Task[Any, Any], task or FakeTask())
    return _answer(fake, Delivery("task", retries, 60, 90), outcome)


def test_a_completed_scan_returns_its_result() -> None:
    done = result(uuid4())
    assert answer(Completed(done)) == done.model_dump(mode="json")


@pytest.mark.parametrize(
    "outcome",
    [Sharded(2, 20), Skipped("revoked"), Cancelled(result(uuid4(), "revoked")), Failed("why")],
    ids=lambda o: type(o).__name__,
)
def test_recorded_endings_are_acked_without_another_write(outcome: Outcome) -> None:
    with pytest.raises(Ignore):
        answer(outcome)


def test_a_poison_message_is_dead_lettered() -> None:
    with pytest.raises(Reject) as rejected:
        answer(Failed("delivered 5 times", dead_letter=True))
    assert requeued(rejected.value) is False


def test_retry_later_is_a_celery_retry_with_backoff() -> None:
    task = FakeTask()
    with pytest.raises(Retry):
        answer(RetryLater("database away"), task)
    assert len(task.countdowns) == 1
    assert 0 <= task.countdowns[0] <= 1.0


def test_a_retry_whose_publish_fails_goes_back_to_the_queue() -> None:
    """Not dead-lettered with the row left 'running', as it was."""
    with pytest.raises(Reject) as rejected:
        answer(RetryLater("database away"), FakeTask(ConnectionResetError("broker gone")))
    assert requeued(rejected.value) is True


def test_past_the_retries_and_on_requeue_the_message_goes_back() -> None:
    for outcome, retries in ((RetryLater("database away"), 3), (Requeue("shutting down"), 0)):
        with pytest.raises(Reject) as rejected:
            answer(outcome, retries=retries)
        assert requeued(rejected.value) is True
