from __future__ import annotations

from uuid import uuid4

import pytest
from kombu.serialization import dumps as kombu_dumps
from kombu.serialization import loads as kombu_loads

from shared import codec
from shared.protocol import (
    MAX_PRIORITY,
    PRIORITIES,
    SCAN_TASK,
    LimitPolicy,
    build_scan_message,
    queue_arguments,
    time_limits,
)
from shared.redis_keys import result_key
from shared.schemas import ScanConfig, ScanTaskPayload
from shared.settings import Settings

DEFAULTS = LimitPolicy.of(Settings())


def payload(priority: str = "normal", **config: float) -> ScanTaskPayload:
    return ScanTaskPayload.model_validate(
        {
            "scan_id": uuid4(),
            "target": "127.0.0.1",
            "ports": "1-1000",
            "config": ScanConfig.model_validate(config).model_dump(),
            "priority": priority,
        }
    )


def test_message_is_celery_protocol_v2() -> None:
    task_id = uuid4()
    job = payload("high")
    message = build_scan_message(task_id, job, port_count=1000, limits=DEFAULTS)
    body = codec.loads(message.body)
    assert len(body) == 3  # a two-element body kills a Celery worker
    args, kwargs, embed = body
    assert args == [job.model_dump(mode="json")]
    assert kwargs == {}
    assert embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    headers = message.headers
    for name in (
        "lang",
        "task",
        "id",
        "root_id",
        "parent_id",
        "group",
        "retries",
        "eta",
        "expires",
        "timelimit",
        "argsrepr",
        "kwargsrepr",
        "origin",
    ):
        assert name in headers
    assert headers["lang"] == "py"
    assert headers["task"] == SCAN_TASK
    assert headers["id"] == headers["root_id"] == message.correlation_id == str(task_id)
    assert headers["retries"] == 0
    hard, soft = headers["timelimit"]
    assert hard > soft > 0
    assert message.delivery_mode == 2
    assert message.priority == PRIORITIES["high"]
    assert message.content_type == codec.CONTENT_TYPE


def test_priorities_are_ordered_within_the_queue_maximum() -> None:
    values = [PRIORITIES[p] for p in ("low", "normal", "high", "critical")]
    assert values == sorted(values)
    assert len(set(values)) == 4
    assert max(values) <= MAX_PRIORITY == queue_arguments("dlq")["x-max-priority"]


def test_time_limits_grow_with_the_scan() -> None:
    small = time_limits(payload(timeout=1.0, max_concurrent=500), 1000, policy=DEFAULTS)
    large = time_limits(payload(timeout=5.0, max_concurrent=10), 65535, policy=DEFAULTS)
    assert small[0] > small[1]
    assert large[1] > small[1]


@pytest.mark.parametrize(
    ("prefix", "key"),
    [
        ("cybersec:", "cybersec:celery-task-meta-X"),
        ("run", "run_celery-task-meta-X"),
        ("", "celery-task-meta-X"),
    ],
)
def test_result_key_follows_celery_global_keyprefix(prefix: str, key: str) -> None:
    assert result_key(prefix, "X") == key


def test_codec_round_trips_through_kombu() -> None:
    codec.register_with_kombu()
    data = {"a": [1, 2.5, None, "x"], "b": {"c": True}}
    content_type, encoding, raw = kombu_dumps(data, serializer=codec.CODEC_NAME)
    assert content_type == codec.CONTENT_TYPE
    assert kombu_loads(raw, content_type, encoding, accept=[codec.CONTENT_TYPE]) == data


def test_time_limits_count_retries_and_the_rate() -> None:
    """65,535 ports at 100 probes/s need 655 s at the least: a limit under that would fail
    every such scan; retries multiply the filtered worst case."""
    paced = time_limits(payload(rate=100), 65535, policy=DEFAULTS)
    assert paced[1] >= 655
    assert paced[0] > paced[1]
    once = time_limits(payload(retries=0, max_concurrent=10), 1000, policy=DEFAULTS)
    thrice = time_limits(payload(retries=2, max_concurrent=10), 1000, policy=DEFAULTS)
    assert thrice[1] >= 3 * (once[1] - 60)


def test_time_limits_follow_the_workers_rate_ceiling() -> None:
    """A scan with no rate of its own, or a faster one, is paced to the workers' ceiling: its
    limits must allow for that pace, or it fails at them."""
    ceiling = LimitPolicy(cap=1500, margin=30, rate_ceiling=100)
    unpaced = time_limits(payload(), 20_000, policy=ceiling)
    faster = time_limits(payload(rate=1000), 20_000, policy=ceiling)
    assert unpaced == faster == time_limits(payload(rate=100), 20_000, policy=DEFAULTS)
    assert unpaced[1] >= 20_000 * 3 / 100  # 600 s of pacing, under the 1500 s cap
    slower = time_limits(payload(rate=50), 20_000, policy=ceiling)
    assert slower == time_limits(payload(rate=50), 20_000, policy=DEFAULTS)
