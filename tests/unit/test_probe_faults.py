"""The engine under local faults, with fakes around the unit: the event loop is never held by
a paced or discovering scan, a stop reaches a paced discovery, and the scheduler survives a
descriptor shortage and an error read on its fast path. Loopback only."""

from __future__ import annotations

import _socket
import errno
import socket
import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from worker_service.probe import scheduler as scheduler_module
from worker_service.probe.discovery import _pace
from worker_service.probe.runner import ProbeLimits, Probing, runs_inline
from worker_service.probe.scheduler import Scheduler
from worker_service.probe.timing import TokenBucket


def test_a_paced_or_discovering_scan_never_runs_on_the_loop_thread() -> None:
    one = ["127.0.0.1"]
    assert runs_inline(one, [80], Probing(1.0, 100))
    assert not runs_inline(one, [80], Probing(1.0, 100, rate=10))
    assert not runs_inline(one, [80], Probing(1.0, 100, discovery=True))
    assert not runs_inline(one, [80], Probing(1.0, 100), ProbeLimits(rate_ceiling=50))


def test_a_paced_discovery_sees_a_stop_while_it_waits() -> None:
    bucket = TokenBucket(0.001, time.monotonic(), burst=1.0)
    assert _pace(bucket)  # the burst's one token
    stop = threading.Event()
    stop.set()
    assert not _pace(bucket, stop)  # before waiting
    stop.clear()
    result: list[bool] = []
    waiter = threading.Thread(target=lambda: result.append(_pace(bucket, stop)), daemon=True)
    waiter.start()  # would wait ~1000 s for its token
    stop.set()
    waiter.join(10)
    assert not waiter.is_alive()
    assert result == [False]


@pytest.fixture
def listeners() -> Iterator[list[int]]:
    servers = []
    for _ in range(2):
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        servers.append(server)
    yield [s.getsockname()[1] for s in servers]
    for server in servers:
        server.close()


def fake_socket_module(make: Any) -> SimpleNamespace:
    """``_socket`` with its ``socket`` replaced."""
    names = {name: getattr(_socket, name) for name in dir(_socket) if name.isupper()}
    return SimpleNamespace(**names, socket=make)


def test_no_descriptor_left_waits_for_one_in_flight(
    listeners: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """socket() failing with EMFILE is a local shortage: the probe waits for one in flight
    to finish, as for connect()'s, instead of killing the scan."""
    calls = 0

    def make(*args: Any) -> _socket.socket:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise OSError(errno.EMFILE, "Too many open files")
        return _socket.socket(*args)

    monkeypatch.setattr(scheduler_module, "socket", fake_socket_module(make))
    found = Scheduler(timeout=2.0, retries=0, inflight=8, min_timeout=0.1).run(
        ["127.0.0.1"], listeners
    )
    assert {pair: outcome[0] for pair, outcome in found.items()} == {
        ("127.0.0.1", port): "open" for port in listeners
    }


class ErrorOnce:
    """A connect in progress whose SO_ERROR holds an ICMP error once (reading clears it),
    on a real, never-connected socket for epoll."""

    def __init__(self, *args: Any) -> None:
        self.real = _socket.socket(*args)
        self.errors = [errno.EHOSTUNREACH]

    def connect_ex(self, _address: Any) -> int:
        return errno.EINPROGRESS

    def getsockopt(self, *_: Any) -> int:
        return self.errors.pop() if self.errors else 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def test_an_error_read_on_the_fast_path_is_the_probes_outcome(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(scheduler_module, "socket", fake_socket_module(ErrorOnce))
    found = Scheduler(timeout=2.0, retries=0, inflight=8, min_timeout=0.1).run(["127.0.0.1"], [9])
    assert found == {("127.0.0.1", 9): ("filtered", "host-unreach")}
