"""Many scans per worker process: the threads pool against prefork, on a lab network (root).

``python -m bench.pool_bench [--long 7] [--slots 8] [--rounds 3] [--max-seconds 900]``.
The lab (tests/support/lab.py) has one live host in each of ``--long`` /28 networks, its ports
100-1000 dropped, and one more live host for the short scan. A round submits ``--long`` scans
of those /28s (ports 1-1000, default config: each waits on discovery of 15 dropped addresses
and on its host's dropped ports) and right after them one short scan of the lone live host,
all through the whole service (the API on this host, the worker inside the scanner namespace).
Peers, in one run on the same lab and stack: the default node (prefork, 2 processes), the
threads pool (one process, ``--slots`` scans at once) and prefork with ``--slots`` processes.
Printed per peer (medians over the rounds): the wall time until every scan of a round is
SUCCESS, the short scan's submit -> SUCCESS, the worker's peak RSS and PSS (its processes
summed, from /proc), its CPU per round, and the ratio of each to the default node.
Exits 1 if any scan did not end SUCCESS with exactly the lab's open ports, 2 if the time bound
runs out.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from bench._deadline import BenchTimeout, Deadline
from bench._stack import (
    Stack,
    descendants,
    sampled_memory,
    tree_cpu_seconds,
    wait_http,
)
from tests.support.lab import BLOCK, Lab, LabSpec, lab

PORTS = "1-1000"
OPEN = [22, 80, 443]
SHORT = "198.19.0.241"  # the last /28, which no long scan covers
FINAL = ("SUCCESS", "FAILURE", "REVOKED")


@dataclass(frozen=True)
class Peer:
    name: str
    pool: Literal["prefork", "threads"]
    concurrency: int


@dataclass(frozen=True)
class Round:
    wall: float
    """First submit -> every scan of the round SUCCESS."""
    short: float
    """The short scan's submit -> SUCCESS."""
    wrong: list[str]
    """Scans that did not end SUCCESS with exactly the lab's open ports."""


@dataclass
class Measured:
    rounds: list[Round] = field(default_factory=list)
    processes: int = 0
    rss_kb: int = 0
    pss_kb: int = 0
    cpu: float = 0.0
    """Worker CPU seconds per round."""

    def wall(self) -> float:
        return statistics.median(r.wall for r in self.rounds)

    def short(self) -> float:
        return statistics.median(r.short for r in self.rounds)


def network(long: int) -> tuple[LabSpec, list[str]]:
    """The lab and the long scans' targets: /28 number i has one live host, .16i+1."""
    up: dict[str, Sequence[int]] = {SHORT: OPEN}
    filtered: dict[str, str] = {}
    targets = []
    for index in range(long):
        host = f"198.19.0.{16 * index + 1}"
        up[host] = OPEN
        filtered[host] = "100-1000"
        targets.append(f"198.19.0.{16 * index}/28")
    return LabSpec(up=up, filtered=filtered), targets


def truth_of(spec: LabSpec, target: str) -> set[tuple[str, int]]:
    net = ipaddress.ip_network(target)
    return {(a, p) for a, p in spec.truth if ipaddress.ip_address(a) in net}


def scan_round(
    client: httpx.Client, spec: LabSpec, targets: list[str], deadline: Deadline
) -> Round:
    submitted: dict[str, tuple[str, float]] = {}
    started = time.perf_counter()
    for target in [*targets, SHORT]:
        at = time.perf_counter()
        response = client.post("/api/scan", json={"target": target, "ports": PORTS, "force": True})
        response.raise_for_status()
        submitted[response.json()["task_id"]] = (target, at)
    ended: dict[str, tuple[float, dict[str, Any]]] = {}
    while len(ended) < len(submitted):
        deadline.left()
        for task_id in submitted.keys() - ended.keys():
            body = client.get(f"/api/scan/{task_id}").json()
            if body.get("state") in FINAL:
                ended[task_id] = (time.perf_counter(), body)
        time.sleep(0.02)
    wrong = []
    short = 0.0
    for task_id, (target, at) in submitted.items():
        end, body = ended[task_id]
        if target == SHORT:
            short = end - at
        found = {
            (p["address"], p["port"]) for p in (body.get("result") or {}).get("open_ports", [])
        }
        if body["state"] != "SUCCESS" or found != truth_of(spec, target):
            wrong.append(f"{target}: {body['state']}, open {sorted(found)}")
    return Round(max(end for end, _ in ended.values()) - started, short, wrong)


def measure(
    stack: Stack, net: Lab, peer: Peer, targets: list[str], rounds: int, deadline: Deadline
) -> Measured:
    settings = stack.settings.model_copy(
        update={"worker_pool": peer.pool, "worker_concurrency": peer.concurrency}
    )
    net.assert_no_default_route()
    worker = asyncio.run(stack.start_worker(peer.concurrency, settings=settings, wrap=net.wrap()))
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    measured = Measured()
    try:
        asyncio.run(wait_http(worker, f"{stack.api_url}/readyz", 200))
        with httpx.Client(base_url=stack.api_url, headers=headers, timeout=10) as client:
            # Every slot runs one short scan first: imports and pools are warm in each process.
            scan_round(client, net.spec, [SHORT] * (peer.concurrency - 1), deadline)
            measured.processes = len(descendants(worker.pid))
            cpu = tree_cpu_seconds(worker.pid)
            with sampled_memory(worker.pid) as samples:
                for _ in range(rounds):
                    measured.rounds.append(scan_round(client, net.spec, targets, deadline))
            measured.cpu = (tree_cpu_seconds(worker.pid) - cpu) / rounds
        measured.rss_kb = max(rss for rss, _ in samples)
        measured.pss_kb = max(pss for _, pss in samples)
    finally:
        stack.stop(worker)
    return measured


def ratio(value: float, base: float) -> str:
    if not base:
        return "-"
    share = value / base
    return f"{share:.2f}" if share >= 0.1 else f"{share:.3f}"


def print_rows(long: int, results: dict[Peer, Measured]) -> bool:
    base = next(iter(results.values()))
    exact_everywhere = True
    for peer, m in results.items():
        scans = len(m.rounds) * (long + 1)
        wrong = [w for r in m.rounds for w in r.wrong]
        exact_everywhere &= not wrong
        print(
            f"| {peer.name} | {m.processes} | {m.wall():.2f} | {ratio(m.wall(), base.wall())} "
            f"| {m.short():.2f} | {ratio(m.short(), base.short())} "
            f"| {m.rss_kb / 1024:.0f} | {ratio(m.rss_kb, base.rss_kb)} "
            f"| {m.pss_kb / 1024:.0f} | {ratio(m.pss_kb, base.pss_kb)} "
            f"| {m.cpu:.1f} | {scans - len(wrong)}/{scans} |"
        )
        for line in wrong:
            print(f"{peer.name}: {line}", file=sys.stderr)
    return exact_everywhere


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--long", type=int, default=7, help="long scans per round (1-14)")
    parser.add_argument("--slots", type=int, default=8, help="threads and large prefork peers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    args = parser.parse_args(argv)
    if not 1 <= args.long <= 14:
        parser.error("--long: 1 to 14 (one /28 each, the last /28 is the short scan's)")
    deadline = Deadline(args.max_seconds)
    peers = [
        Peer("prefork, 2 processes (default node)", "prefork", 2),
        Peer(f"threads, 1 process, {args.slots} slots", "threads", args.slots),
        Peer(f"prefork, {args.slots} processes", "prefork", args.slots),
    ]
    spec, targets = network(args.long)
    print(
        f"| worker ({args.long} long scans + 1 short, at once) | processes "
        "| all SUCCESS s | x default | short scan submit→SUCCESS s | x default "
        "| worker RSS MB (peak) | x default | PSS MB (peak) | x default "
        "| worker CPU s / round | scans exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    results: dict[Peer, Measured] = {}
    try:
        with lab(spec) as net:
            net.bridge()
            stack = Stack()
            stack.settings = stack.settings.model_copy(
                update={"target_allow": (BLOCK,), "shutdown_timeout": 2}
            )
            try:
                asyncio.run(stack.setup())
                asyncio.run(stack.start_api())
                for peer in peers:
                    results[peer] = measure(stack, net, peer, targets, args.rounds, deadline)
            finally:
                problems = stack.teardown()
                if problems:
                    print(f"cleanup: {problems}", file=sys.stderr)
    except BenchTimeout as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0 if print_rows(args.long, results) else 1


if __name__ == "__main__":
    sys.exit(main())
