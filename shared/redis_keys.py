"""Every Redis key the services use, built from the deployment's prefix in one place."""

from __future__ import annotations

from uuid import UUID


def _prefix(prefix: str) -> str:
    # Celery appends "_" to a global_keyprefix that does not end in a separator; so do we.
    return prefix if not prefix or prefix[-1] in ":_-." else prefix + "_"


def result_key(prefix: str, task_id: UUID | str) -> str:
    """Where Celery's result backend keeps a task's state (``global_keyprefix``)."""
    return f"{_prefix(prefix)}celery-task-meta-{task_id}"


def events_key(prefix: str, task_id: UUID | str) -> str:
    """A Redis stream of a scan's progress, open-port and end events (SSE replays it)."""
    return f"{_prefix(prefix)}events:{task_id}"


def active_key(prefix: str, owner: UUID | str) -> str:
    """Sorted set of a key's queued or running task ids, scored by their deadline."""
    return f"{_prefix(prefix)}active:{owner}"


def rate_key(prefix: str, owner: UUID | str, window: int) -> str:
    """Counter of a key's submissions in one minute window."""
    return f"{_prefix(prefix)}rate:{owner}:{window}"


def critical_key(prefix: str, owner: UUID | str, window: int) -> str:
    """Counter of a key's critical-priority submissions in one minute window."""
    return f"{_prefix(prefix)}critical:{owner}:{window}"


def owner_key(prefix: str, task_id: UUID | str) -> str:
    """``owner_value`` of a task: lets status reads check ownership while PostgreSQL is
    unreachable."""
    return f"{_prefix(prefix)}owner:{task_id}"


def owner_value(owner: UUID, scan_id: UUID) -> str:
    return f"{owner}:{scan_id}"


def parse_owner_value(value: str) -> tuple[str, UUID]:
    """(key id, scan id) from ``owner_value``."""
    key_id, _, scan_id = value.partition(":")
    return key_id, UUID(scan_id)


def shards_key(prefix: str, task_id: UUID | str) -> str:
    """Hash of a sharded scan's per-shard progress, summed into its one progress."""
    return f"{_prefix(prefix)}shards:{task_id}"
