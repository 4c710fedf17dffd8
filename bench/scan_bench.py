"""Our scan engine against ``nmap -sT -T4`` on a 50-port fixture inside a private network namespace.

``python -m bench.scan_bench [--rounds 3] [--max-seconds 600]`` (needs root for ``ip netns``).
Both scanners run as commands under ``ip netns exec``, so start-up is timed for both; the table
also shows the engine's own time measured inside the command. Exits 1 if our open-port set ever
differs from the fixture's, 2 if the time bound runs out.
"""

from __future__ import annotations

import argparse
import ast
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench._deadline import BenchTimeout, Deadline

RANGES = ("1-65535", "1-1000")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENGINE_CLI = os.path.join(ROOT, "bench", "engine_cli.py")
FIXTURE_PORTS = 50


@dataclass
class Runs:
    engine: str
    ports: str
    walls: list[float] = field(default_factory=list)
    inner: list[float] = field(default_factory=list)
    found: list[set[int]] = field(default_factory=list)


def fixture_ports(seed: int) -> list[int]:
    """Ports spread over the whole range, a few in every tier and in the ephemeral range."""
    rng = random.Random(seed)
    chosen = {22, 80, 443, 5432, 6379, 8080}
    chosen.update(rng.sample(range(1, 1001), 10))
    chosen.update(rng.sample(range(32768, 61000), 10))
    while len(chosen) < FIXTURE_PORTS:
        chosen.add(rng.randrange(1, 65536))
    return sorted(chosen)


def count_ports(spec: str) -> int:
    first, _, last = spec.partition("-")
    return int(last or first) - int(first) + 1


def run_nmap(netns: str, spec: str, deadline: Deadline) -> tuple[float, float, set[int]]:
    cmd = ["ip", "netns", "exec", netns, "nmap", "-sT", "-T4", "-n", "-Pn", "-p", spec]
    started = time.perf_counter()
    out = subprocess.run(
        [*cmd, "-oG", "-", "127.0.0.1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=deadline.left(),
    ).stdout
    wall = time.perf_counter() - started
    found: set[int] = set()
    for line in out.splitlines():
        if "Ports:" in line:
            for entry in line.split("Ports:", 1)[1].split("\t")[0].split(","):
                port, state = entry.strip().split("/")[:2]
                if state == "open":
                    found.add(int(port))
    return wall, wall, found


def run_engine(
    netns: str, spec: str, extra: Sequence[str], deadline: Deadline
) -> tuple[float, float, set[int]]:
    # -S skips site (the engine needs only the standard library and this checkout, which is
    # the working directory): the same start-up a lean deployment of the engine would pay.
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-S", ENGINE_CLI]
    started = time.perf_counter()
    out = subprocess.run(
        [*cmd, "127.0.0.1", spec, *extra],
        capture_output=True,
        text=True,
        check=True,
        timeout=deadline.left(),
        cwd=ROOT,
    ).stdout
    wall = time.perf_counter() - started
    report = ast.literal_eval(out)
    return wall, float(report["seconds"]), set(report["open"])


def compile_engine() -> None:
    """Write the engine's bytecode, as installing a package does: with PYTHONDONTWRITEBYTECODE
    set (it is, on CI) every cold command would otherwise compile its modules from source."""
    packages = [os.path.join(ROOT, name) for name in ("shared", "worker_service", "bench")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *packages], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=1000)
    args = parser.parse_args(argv)
    deadline = Deadline(args.max_seconds)
    netns = f"cybersec-bench-{os.getpid()}"
    expected = set(fixture_ports(args.seed))
    ours = ["--concurrency", str(args.concurrency)]
    engines: dict[str, Callable[[str], tuple[float, float, set[int]]]] = {
        "nmap -sT -T4": lambda spec: run_nmap(netns, spec, deadline),
        "ours (blocking CLI)": lambda spec: run_engine(netns, spec, ours, deadline),
        "ours (scan_host, asyncio)": lambda spec: run_engine(
            netns, spec, [*ours, "--asyncio"], deadline
        ),
    }
    runs = {(name, spec): Runs(name, spec) for spec in RANGES for name in engines}
    compile_engine()
    subprocess.run(["ip", "netns", "add", netns], check=True)
    fixture: subprocess.Popen[str] | None = None
    try:
        subprocess.run(["ip", "netns", "exec", netns, "ip", "link", "set", "lo", "up"], check=True)
        fixture = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "tests.support.lab_listen"]
            + [f"127.0.0.1:{port}" for port in sorted(expected)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert fixture.stdout is not None
        if fixture.stdout.readline().strip() != "ready":
            raise RuntimeError("the fixture did not start")
        for spec in RANGES:
            for _round in range(args.rounds):
                for name, engine in engines.items():
                    wall, inner, found = engine(spec)
                    run = runs[(name, spec)]
                    run.walls.append(wall)
                    run.inner.append(inner)
                    run.found.append(found)
    except BenchTimeout as exc:
        print(exc, file=sys.stderr)
        return 2
    finally:
        if fixture is not None:
            fixture.communicate(timeout=10)  # closing its stdin stops it
        subprocess.run(["ip", "netns", "del", netns], check=False)
    return print_table(runs, expected)


def print_table(runs: dict[tuple[str, str], Runs], expected: set[int]) -> int:
    mismatch = False
    header = (
        f"{'engine':<27} {'range':<8} {'median wall s':>13} {'in-engine s':>11} "
        f"{'ports/s':>8} {'open':>5} {'matches fixture':>15} {'ratio vs nmap':>13}"
    )
    print(f"fixture: {len(expected)} open ports; median of {len(next(iter(runs.values())).walls)}")
    print(header)
    for (name, spec), run in runs.items():
        wall = statistics.median(run.walls)
        inner = statistics.median(run.inner)
        nmap_wall = statistics.median(runs[("nmap -sT -T4", spec)].walls)
        matches = all(found & expected_in(spec, expected) == found for found in run.found) and all(
            found == expected_in(spec, expected) for found in run.found
        )
        mismatch |= not matches and not name.startswith("nmap")
        opened = "/".join(sorted({str(len(found)) for found in run.found}))
        print(
            f"{name:<27} {spec:<8} {wall:>13.3f} {inner:>11.3f} "
            f"{count_ports(spec) / wall:>8.0f} {opened:>5} {'yes' if matches else 'NO':>15} "
            f"{wall / nmap_wall:>13.2f}"
        )
    return 1 if mismatch else 0


def expected_in(spec: str, expected: set[int]) -> set[int]:
    first, _, last = spec.partition("-")
    return {port for port in expected if int(first) <= port <= int(last)}


if __name__ == "__main__":
    sys.exit(main())
