"""Our scanner against ``nmap -sT -T4`` on a lab network (tests/support/lab.py), side by side.

``python -m bench.network_bench [--runs 10] [--nmap-runs 3] [--max-seconds 1500]`` (root).
The service runs with its default settings (a large scan splits into shards as it would in
production); ``--one-task`` raises the split threshold so every scan is one task, to compare.
Scenarios: (a) a /24 with three live hosts (one drops ports 1-500), ports 1-1000 plus two;
(b) the same with 3% of inbound SYNs dropped at random; (c) one host, all 65,535 ports, with
10000-29999 dropped. Each is scanned by nmap, by the engine as a command in the scanner
namespace, and through the whole service (submit -> SUCCESS; the API here, a worker inside
the scanner namespace). Printed per scanner: median wall time, ratio to nmap, SYNs counted at
the target (every probe and retransmission that arrived), our own retransmission count, and
the open-port set against the lab's truth (runs exact / runs, missing, false opens).
Exits 1 if any of our runs differs from the truth, 2 if the time bound runs out.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench._deadline import BenchTimeout, Deadline
from bench._stack import Stack, wait_http
from tests.support.lab import BLOCK, Lab, LabSpec, lab

Pair = tuple[str, int]


@dataclass(frozen=True)
class Scenario:
    name: str
    spec: LabSpec
    target: str
    ports: str
    runs: int


@dataclass
class Runs:
    walls: list[float] = field(default_factory=list)
    syns: list[int] = field(default_factory=list)
    retransmissions: list[int] = field(default_factory=list)
    found: list[set[Pair]] = field(default_factory=list)


NETWORK = LabSpec(
    up={
        "198.19.0.10": [22, 80, 443, 3306],
        "198.19.0.20": [25, 587, 993],
        "198.19.0.30": [111, 700, 8080],
    },
    filtered={"198.19.0.30": "1-500"},
)
ONE_HOST = LabSpec(
    up={"198.19.0.10": [22, 80, 443, 5432, 15000, 40000, 65535]},
    filtered={"198.19.0.10": "10000-29999"},
)


def scenarios(runs: int) -> list[Scenario]:
    lossy = LabSpec(up=NETWORK.up, filtered=NETWORK.filtered, loss=3)
    return [
        Scenario("(a) /24, 3 live, 1000+2 ports", NETWORK, BLOCK, "1-1000,3306,8080", 3),
        Scenario("(b) same, 3% SYN loss", lossy, BLOCK, "1-1000,3306,8080", runs),
        Scenario("(c) 1 host, 65535 ports, 20k filtered", ONE_HOST, "198.19.0.10", "1-65535", 3),
    ]


def in_ports(truth: set[Pair], spec: str) -> set[Pair]:
    wanted: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        wanted.update(range(int(first), int(last or first) + 1))
    return {(a, p) for a, p in truth if p in wanted}


def run_nmap(net: Lab, scenario: Scenario, deadline: Deadline) -> tuple[float, int, set[Pair]]:
    net.assert_no_default_route()
    command = ["nmap", "-sT", "-T4", "-n", "-p", scenario.ports, "-oX", "-", scenario.target]
    started = time.perf_counter()
    out = subprocess.run(
        [*net.wrap(), *command],
        capture_output=True,
        text=True,
        check=True,
        timeout=deadline.left(),
    ).stdout
    wall = time.perf_counter() - started
    found: set[Pair] = set()
    for host in ET.fromstring(out).iter("host"):  # noqa: S314 - nmap's own output
        address = host.find("address")
        assert address is not None
        for port in host.iter("port"):
            state = port.find("state")
            if state is not None and state.get("state") == "open":
                found.add((address.get("addr", ""), int(port.get("portid", "0"))))
    return wall, -1, found


def run_engine(net: Lab, scenario: Scenario, deadline: Deadline) -> tuple[float, int, set[Pair]]:
    started = time.perf_counter()
    report = net.scan(scenario.target, scenario.ports, {}, timeout=deadline.left())
    wall = time.perf_counter() - started
    found = {(a, p) for a, p in report["open"]}
    return wall, int(report["retransmissions"]), found


class Service:
    """The API on this host, one worker (2 processes) in the lab's scanner namespace."""

    def __init__(self, stack: Stack, net: Lab, *, one_task: bool) -> None:
        self.stack = stack
        self.net = net
        self.one_task = one_task
        self.shards: set[int] = set()
        """Shards per scan seen in this scenario's results (1: the scan ran as one task)."""

    async def start(self) -> None:
        stack = self.stack
        update: dict[str, object] = {"target_allow": (BLOCK,)}
        if self.one_task:
            update["shard_min_ports"] = 1_000_000  # one task per scan: one worker's engine
        stack.settings = stack.settings.model_copy(update=update)
        await stack.setup()
        await stack.start_api()
        worker = await stack.start_worker(2, wrap=self.net.wrap())
        await wait_http(worker, f"{stack.api_url}/readyz", 200)

    def __call__(
        self, _net: Lab, scenario: Scenario, deadline: Deadline
    ) -> tuple[float, int, set[Pair]]:
        headers = {"Authorization": f"Bearer {self.stack.api_key}"}
        body = {"target": scenario.target, "ports": scenario.ports, "force": True}
        with httpx.Client(base_url=self.stack.api_url, headers=headers, timeout=10) as client:
            started = time.perf_counter()
            response = client.post("/api/scan", json=body)
            response.raise_for_status()
            task_id = response.json()["task_id"]
            status: dict[str, Any] = {}
            while status.get("state") not in ("SUCCESS", "FAILURE", "REVOKED"):
                deadline.left()
                time.sleep(0.02)
                status = client.get(f"/api/scan/{task_id}").json()
            wall = time.perf_counter() - started
        if status["state"] != "SUCCESS":
            raise RuntimeError(f"scan ended {status['state']}: {status.get('error')}")
        result = status["result"]
        self.shards.add(int(result["shards"]))
        found = {(p["address"], p["port"]) for p in result["open_ports"]}
        return wall, int(result["retransmissions"]), found


Scanner = Callable[[Lab, Scenario, Deadline], tuple[float, int, set[Pair]]]
SERVICE = "service (submit→SUCCESS)"


def measure(
    net: Lab, scenario: Scenario, scanners: dict[str, Scanner], nmap_runs: int, deadline: Deadline
) -> dict[str, Runs]:
    results = {name: Runs() for name in scanners}
    for index in range(scenario.runs):
        for name, scanner in scanners.items():
            if name.startswith("nmap") and index >= nmap_runs:
                continue
            net.reset_syn_count()
            wall, retransmissions, found = scanner(net, scenario, deadline)
            run = results[name]
            run.walls.append(wall)
            run.syns.append(net.syn_count())
            run.retransmissions.append(retransmissions)
            run.found.append(found)
    return results


def print_rows(scenario: Scenario, results: dict[str, Runs]) -> bool:
    truth = in_ports(scenario.spec.truth, scenario.ports)
    nmap_wall = statistics.median(results["nmap -sT -T4"].walls)
    exact_everywhere = True
    for name, run in results.items():
        wall = statistics.median(run.walls)
        exact = sum(found == truth for found in run.found)
        missing = max(len(truth - found) for found in run.found)
        false_open = max(len(found - truth) for found in run.found)
        retrans = (
            "-" if run.retransmissions[0] < 0 else str(int(statistics.median(run.retransmissions)))
        )
        if not name.startswith("nmap"):
            exact_everywhere &= exact == len(run.found)
        print(
            f"| {scenario.name} | {name} | {wall:.2f} | {wall / nmap_wall:.2f} "
            f"| {int(statistics.median(run.syns))} | {retrans} "
            f"| {exact}/{len(run.found)} | {missing} | {false_open} |"
        )
    return exact_everywhere


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10, help="our runs of the lossy scenario")
    parser.add_argument("--nmap-runs", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=1500.0)
    parser.add_argument("--no-service", action="store_true", help="engine and nmap only")
    parser.add_argument(
        "--one-task",
        action="store_true",
        help="never split a scan into shards (CYBERSEC_SHARD_MIN_PORTS raised); default: as set",
    )
    parser.add_argument("--only", default="abc", help="scenarios to run, e.g. ab")
    args = parser.parse_args(argv)
    deadline = Deadline(args.max_seconds)
    print(
        "| scenario | scanner | median wall s | x nmap | SYNs at target (median) "
        "| retransmissions | runs exact | most missing | most false open |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    all_exact = True
    try:
        for scenario in scenarios(args.runs):
            if scenario.name[1] not in args.only:
                continue
            with lab(scenario.spec) as net:
                stack = Stack()
                try:
                    scanners: dict[str, Scanner] = {
                        "nmap -sT -T4": run_nmap,
                        "engine (command)": run_engine,
                    }
                    service = None
                    if not args.no_service:
                        net.bridge()
                        service = Service(stack, net, one_task=args.one_task)
                        asyncio.run(service.start())
                        scanners[SERVICE] = service
                    results = measure(net, scenario, scanners, args.nmap_runs, deadline)
                    if service is not None:
                        shards = "/".join(str(n) for n in sorted(service.shards))
                        label = f"service (submit→SUCCESS, {shards} shard(s))"
                        results[label] = results.pop(SERVICE)
                finally:
                    problems = stack.teardown()
                    if problems:
                        print(f"cleanup: {problems}", file=sys.stderr)
                all_exact &= print_rows(scenario, results)
                sys.stdout.flush()
    except BenchTimeout as exc:
        print(exc, file=sys.stderr)
        return 2
    return 0 if all_exact else 1


if __name__ == "__main__":
    sys.exit(main())
