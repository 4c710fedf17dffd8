"""Non-blocking connects read on epoll: how one answer is classified, and probe processes.

Measured on loopback, a plain epoll loop serves ~3x the ports/s of asyncio's ``sock_connect``
(CPU in the Python process is the bound, not descriptors), so the engine's hot path avoids the
event loop entirely (the loop itself is ``scheduler``). A large tier is split over one probe
process per CPU: run as a script (``python -I -S sweep.py``) this module is one probe process;
it reads a job as JSON on stdin and writes progress and result lines on stdout. It imports only
the standard library so a probe process starts in ~10 ms and never forks one that holds threads.
"""

from __future__ import annotations

import _socket as socket
import errno
import os
import sys

if __package__ in (None, ""):
    # Run as a probe process (``python -I -S sweep.py``): find the package from the file.
    sys.path.insert(0, __file__.rsplit("/worker_service/", 1)[0])

# Only C-level modules at run time: ``socket`` (enum), ``collections`` and ``typing`` would
# double the start-up of a probe process or a one-shot scan command.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import selectors
    import subprocess
    import threading
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any, Final

    from worker_service.probe.scheduler import HostStats, Pair

    Tick = Callable[[int, list[Pair]], None]

Outcome = tuple[str, str]
"""(state, reason) of one port; state is one of shared.schemas.PortState."""

REFUSED: Final[Outcome] = ("closed", "conn-refused")
MAX_INFLIGHT: Final = 4096
"""Connects in flight per process. Loopback throughput peaks near 1,000; more only helps hosts
that drop probes, and costs nothing in accuracy because readiness is read before any expiry."""
POLL_CAP: Final = 0.1
"""Longest single epoll wait, so a stop request is seen promptly."""
LOCAL_SHORTAGE: Final = frozenset({errno.EADDRNOTAVAIL, errno.EMFILE, errno.ENFILE, errno.ENOBUFS})
"""connect() failures that describe this machine (no ephemeral port, no descriptor), not the
target: the port is retried once something in flight finishes."""
_FILTERED_REASONS: Final = {
    errno.ETIMEDOUT: "no-response",
    errno.EHOSTUNREACH: "host-unreach",
    errno.ENETUNREACH: "net-unreach",
    errno.EACCES: "admin-prohibited",
    errno.EPERM: "admin-prohibited",
    errno.EINVAL: "no-route",
}
LINGER_RESET: Final = b"\x01\x00\x00\x00\x00\x00\x00\x00"
"""struct linger {1, 0}: close with RST, leaving no TIME_WAIT behind per open port."""


def is_self_connect(local: tuple[Any, ...], peer: tuple[Any, ...]) -> bool:
    """True when a connect landed on its own source port (loopback simultaneous open)."""
    return local[:2] == peer[:2]


def classify_error(code: int) -> Outcome:
    """The outcome of a connect that failed with this errno."""
    if code == errno.ECONNREFUSED:
        return REFUSED
    return ("filtered", _FILTERED_REASONS.get(code) or errno.errorcode.get(code, f"errno-{code}"))


def connected(sock: socket.socket) -> Outcome:
    """The outcome of a connect that succeeded; raises OSError if it has not."""
    if is_self_connect(sock.getsockname(), sock.getpeername()):
        return ("closed", "self-connect")
    return ("open", "syn-ack")


# --- probe process protocol -------------------------------------------------------------------
# stdin:  one JSON object {"hosts", "seeds": {address: [srtt, rttvar]}, "ports": [[first, last],
#         ...], "share": [i, n] (every n-th port from the i-th), "timeout", "min_timeout",
#         "retries", "inflight", "rate", "tick"}
# stdout: "T <finished> <address/port,...>" progress lines, then one "R <json>" line with
#         {"notable": [[address, port, state, reason], ...], "stats": {address: [probes,
#         retransmissions, answered]}, "timing": {address: [srtt, rttvar]}}


class ProbeJob:
    """What one probe process is asked to do, and what it hands back."""

    def __init__(
        self,
        hosts: Sequence[str],
        ports: Sequence[int],
        *,
        timeout: float,
        min_timeout: float,
        retries: int,
        inflight: int,
        rate: float | None,
        seeds: dict[str, tuple[float, float]],
        tick: float,
        share: tuple[int, int] = (0, 1),
    ) -> None:
        self.hosts = list(hosts)
        self.ports = ports
        self.share = share
        """(i, n): this process probes every n-th of ``ports`` from the i-th."""
        self.timeout = timeout
        self.min_timeout = min_timeout
        self.retries = retries
        self.inflight = inflight
        self.rate = rate
        self.seeds = seeds
        self.tick = tick

    def encode(self) -> dict[str, Any]:
        return {
            "hosts": self.hosts,
            "seeds": {a: list(s) for a, s in self.seeds.items() if a in self.hosts},
            "ports": encode_ranges(self.ports),
            "share": list(self.share),
            "timeout": self.timeout,
            "min_timeout": self.min_timeout,
            "retries": self.retries,
            "inflight": self.inflight,
            "rate": self.rate,
            "tick": self.tick,
        }


class ProbeResult:
    """Outcomes, per-host counts and timing from probe processes, merged."""

    def __init__(self) -> None:
        self.notable: dict[Pair, Outcome] = {}
        self.stats: dict[str, list[int]] = {}
        self.timing: dict[str, tuple[float, float]] = {}

    def add(self, raw: dict[str, Any]) -> None:
        for address, port, state, reason in raw["notable"]:
            self.notable[(address, port)] = (state, reason)
        for address, counts in raw["stats"].items():
            mine = self.stats.setdefault(address, [0, 0, 0])
            for i, count in enumerate(counts):
                mine[i] += count
        for address, (srtt, rttvar) in raw["timing"].items():
            if srtt >= 0 and self.timing.get(address, (-1.0, 0.0))[0] < 0:
                self.timing[address] = (srtt, rttvar)


def encode_ranges(ports: Sequence[int]) -> list[list[int]]:
    """Sorted ports as [first, last] runs: a 65,535-port job is a few bytes of JSON."""
    runs: list[list[int]] = []
    for port in ports:
        if runs and runs[-1][1] + 1 == port:
            runs[-1][1] = port
        else:
            runs.append([port, port])
    return runs


def _expand(runs: list[list[int]]) -> Iterator[int]:
    for first, last in runs:
        yield from range(first, last + 1)


def parse_line(line: bytes) -> tuple[int, list[Pair]] | dict[str, Any]:
    """One probe process output line: a progress tick or the final result."""
    import json  # lazily: a sweep that never splits need not import it

    kind, _, rest = line.rstrip(b"\n").partition(b" ")
    if kind == b"T":
        count, _, opened = rest.partition(b" ")
        pairs = []
        for item in opened.decode().split(","):
            if item:
                address, _, port = item.rpartition("/")
                pairs.append((address, int(port)))
        return int(count), pairs
    if kind == b"R":
        raw: dict[str, Any] = json.loads(rest)
        return raw
    raise ValueError(f"unexpected probe process output {line[:80]!r}")


class ProbeProcessError(RuntimeError):
    """A probe process failed; says nothing about the target."""


def run_processes(
    jobs: Sequence[ProbeJob],
    *,
    on_tick: Tick | None = None,
    stop: threading.Event | None = None,
) -> ProbeResult:
    """Run each job in its own probe process; ticks are forwarded from every one."""
    import json  # lazily: a sweep that never splits need not import these
    import selectors
    import subprocess

    procs: list[subprocess.Popen[bytes]] = []
    selector = selectors.DefaultSelector()
    try:
        for job in jobs:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", __file__],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            procs.append(proc)
            assert proc.stdin is not None
            proc.stdin.write(json.dumps(job.encode()).encode())
            proc.stdin.close()
        return _collect(procs, selector, on_tick, stop)
    finally:
        selector.close()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def _collect(
    procs: list[subprocess.Popen[bytes]],
    selector: selectors.BaseSelector,
    on_tick: Tick | None,
    stop: threading.Event | None,
) -> ProbeResult:
    import selectors

    buffers: dict[int, bytearray] = {}
    for proc in procs:
        for pipe in (proc.stdout, proc.stderr):
            assert pipe is not None
            selector.register(pipe, selectors.EVENT_READ, proc)
            buffers[pipe.fileno()] = bytearray()
    result = ProbeResult()
    results = 0
    while selector.get_map():
        if stop is not None and stop.is_set():
            return result
        for key, _events in selector.select(POLL_CAP):
            fd = key.fd
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                selector.unregister(key.fileobj)
                continue
            buffer = buffers[fd]
            buffer += chunk
            proc = key.data
            if key.fileobj is not proc.stdout:
                continue
            *lines, rest = buffer.split(b"\n")
            buffers[fd] = bytearray(rest)
            for line in lines:
                parsed = parse_line(bytes(line))
                if isinstance(parsed, dict):
                    result.add(parsed)
                    results += 1
                elif on_tick is not None:
                    on_tick(*parsed)
    if results != len(procs):
        codes = [proc.wait() for proc in procs]
        errors = b" | ".join(
            bytes(buffers[p.stderr.fileno()]).strip().splitlines()[-1]
            for p in procs
            if p.stderr is not None and buffers[p.stderr.fileno()].strip()
        )
        raise ProbeProcessError(f"probe processes exited {codes}: {errors.decode('replace')}")
    return result


def _stats_list(stats: dict[str, HostStats]) -> dict[str, list[int]]:
    return {address: counts.as_list() for address, counts in stats.items()}


def _serve() -> None:
    import json  # lazily: a sweep that never splits need not import it

    from worker_service.probe.scheduler import Scheduler
    from worker_service.probe.timing import TokenBucket

    job = json.load(sys.stdin)
    out = sys.stdout

    def tick(count: int, opened: list[Pair]) -> None:
        out.write(f"T {count} {','.join(f'{a}/{p}' for a, p in opened)}\n")
        out.flush()

    import time

    rate = job["rate"]
    scheduler = Scheduler(
        timeout=job["timeout"],
        min_timeout=job["min_timeout"],
        retries=job["retries"],
        inflight=job["inflight"],
        bucket=TokenBucket(rate, time.monotonic()) if rate else None,
        on_tick=tick,
        tick_interval=job["tick"],
    )
    for address in job["hosts"]:
        seed = job["seeds"].get(address)
        scheduler.host(address, (seed[0], seed[1]) if seed else None)
    first, step = job["share"]
    notable = scheduler.run(job["hosts"], list(_expand(job["ports"]))[first::step])
    raw = {
        "notable": [[a, p, state, reason] for (a, p), (state, reason) in notable.items()],
        "stats": _stats_list(scheduler.stats),
        "timing": {a: list(t.state) for a, t in scheduler.timing.items()},
    }
    out.write("R " + json.dumps(raw) + "\n")
    out.flush()


if __name__ == "__main__":
    _serve()
