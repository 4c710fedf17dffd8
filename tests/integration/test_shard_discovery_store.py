"""A sharded scan's discovery rides on its row: the shards and the merge read it, and a
redelivery of the split keeps the first delivery's answer."""

from __future__ import annotations

from uuid import uuid4

from shared.schemas import ScanConfig
from shared.store import ScanStore
from worker_service.plan import discovery_record, known_states
from worker_service.probe.discovery import HostState

ADDRESSES = ["198.18.0.5", "198.18.0.6", "198.18.0.7"]


async def test_discovery_is_recorded_once_with_the_shards(store: ScanStore) -> None:
    scan_id = uuid4()
    await store.insert(
        scan_id=scan_id,
        task_id=uuid4(),
        target="198.18.0.4/30",
        ports="1-100",
        config=ScanConfig(),
        priority="normal",
    )
    await store.mark_running(scan_id, 600)
    first = {
        "198.18.0.5": HostState(True, "syn-ack", (0.002, 0.001)),
        "198.18.0.6": HostState(False, "no-response"),
        "198.18.0.7": HostState(True, "reset"),
    }
    plan = [(["198.18.0.5"], "1-100"), (["198.18.0.7"], "1-100")]
    await store.start_shards(scan_id, ADDRESSES, plan, 600, discovery_record(ADDRESSES, first))
    # A redelivery that discovered again (another answer) finds the first one recorded.
    again = {address: HostState(True, "echo-reply") for address in ADDRESSES}
    pending = await store.start_shards(
        scan_id, ADDRESSES, plan, 600, discovery_record(ADDRESSES, again)
    )
    assert [shard.addresses for shard in pending] == [("198.18.0.5",), ("198.18.0.7",)]
    row = await store.get(scan_id)
    assert row is not None
    assert row.discovery is not None
    states = known_states(row.discovery)
    assert {a: (s.up, s.reason, s.seed) for a, s in states.items()} == {
        "198.18.0.5": (True, "syn-ack", (0.002, 0.001)),
        "198.18.0.6": (False, "no-response", None),
        "198.18.0.7": (True, "reset", None),
    }
