"""A network that behaves like a real one: two namespaces joined by a veth pair.

The scanner namespace routes only the lab's block (198.19.0.0/24, RFC 2544 benchmarking space)
to the target namespace and has no default route, asserted before anything is probed. The
target namespace owns the "up" addresses (on its ``lo``, with listeners); every other address
of the block is routed there and silently dropped (forwarding is off). nftables in the target
namespace counts inbound SYNs (to any address of the block), drops filtered port ranges and,
optionally, a random share of SYNs (``numgen random mod 100 < N``). ``bridge()`` makes
PostgreSQL, Redis and RabbitMQ of the host reachable on 127.0.0.1 inside the scanner
namespace, through Unix sockets and socat, so a real worker can run there. Used by tests/lab
and bench/network_bench.py, bench/pool_bench.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
BLOCK = "198.19.0.0/24"
SCANNER_LINK, TARGET_LINK = "198.18.0.1", "198.18.0.2"
SERVICE_PORTS = (5432, 6379, 5672)
_ids = itertools.count()


@dataclass(frozen=True)
class LabSpec:
    """What the lab's target side looks like."""

    up: dict[str, Sequence[int]]
    """Live addresses and the ports that listen on each (may be empty: up, all closed)."""
    filtered: dict[str, str] = field(default_factory=dict)
    """Address -> nftables port range dropped there, e.g. ``"1-500"``."""
    tarpits: dict[str, str] = field(default_factory=dict)
    """Address -> port range with a listener on every port (answering with ``banner``)."""
    loss: int = 0
    """Percent of inbound SYNs dropped at random."""
    banner: str = ""

    @property
    def truth(self) -> set[tuple[str, int]]:
        """Every (address, port) that is open."""
        opened = {(a, p) for a, ports in self.up.items() for p in ports}
        for address, spec in self.tarpits.items():
            first, _, last = spec.partition("-")
            opened |= {(address, p) for p in range(int(first), int(last or first) + 1)}
        return {
            (a, p) for a, p in opened if not (a in self.filtered and _in_range(p, self.filtered[a]))
        }


def _in_range(port: int, spec: str) -> bool:
    first, _, last = spec.partition("-")
    return int(first) <= port <= int(last or first)


def run(*args: str, netns: str | None = None, stdin: str | None = None, timeout: float = 30) -> str:
    command = [*(["ip", "netns", "exec", netns] if netns else []), *args]
    done = subprocess.run(
        command,
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        cwd=ROOT,
    )
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")
    return done.stdout


class Lab:
    """A running lab; ``scanner`` and ``target`` are the namespaces' names."""

    def __init__(self, spec: LabSpec, scanner: str, target: str, workdir: Path) -> None:
        self.spec = spec
        self.scanner = scanner
        self.target = target
        self.workdir = workdir
        self.processes: list[subprocess.Popen[str]] = []

    def wrap(self) -> list[str]:
        """The command prefix that runs a program inside the scanner namespace."""
        return ["ip", "netns", "exec", self.scanner]

    def assert_no_default_route(self) -> None:
        for family in ("-4", "-6"):
            routes = run("ip", family, "route", "show", "default", netns=self.scanner).strip()
            assert not routes, f"the lab's scanner namespace has a default route: {routes}"

    def nft(self, script: str) -> None:
        run("nft", "-f", "-", netns=self.target, stdin=script)

    def set_loss(self, percent: int) -> None:
        """Replace the random SYN loss rule (0: none)."""
        self.nft("flush chain inet lab loss\n" + _loss_rule(percent))

    def syn_count(self) -> int:
        """Inbound SYNs the target namespace has seen since the lab started (or last reset)."""
        out = run("nft", "-j", "list", "counter", "inet", "lab", "syns", netns=self.target)
        for item in json.loads(out)["nftables"]:
            if "counter" in item:
                packets: int = item["counter"]["packets"]
                return packets
        raise RuntimeError("no syns counter in the lab")

    def reset_syn_count(self) -> None:
        run("nft", "reset", "counter", "inet", "lab", "syns", netns=self.target)

    def scan(
        self, target: str, ports: str, config: dict[str, object], timeout: float = 120
    ) -> dict[str, Any]:
        """The engine as a command (``python -m worker_service.probe``) in the scanner side."""
        self.assert_no_default_route()
        out = run(
            sys.executable,
            "-m",
            "worker_service.probe",
            target,
            ports,
            json.dumps(config),
            netns=self.scanner,
            timeout=timeout,
        )
        report: dict[str, Any] = json.loads(out)
        return report

    def spawn(self, args: list[str], netns: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            ["ip", "netns", "exec", netns, *args],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.processes.append(process)
        return process

    def bridge(self, ports: Sequence[int] = SERVICE_PORTS) -> None:
        """Make the host's 127.0.0.1:port reachable as 127.0.0.1:port in the scanner side."""
        for port in ports:
            path = self.workdir / f"{port}.sock"
            outside = subprocess.Popen(
                ["socat", f"UNIX-LISTEN:{path},fork", f"TCP:127.0.0.1:{port}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.processes.append(outside)  # type: ignore[arg-type]
            _wait_for(path.exists, f"socat socket {path}")
            inside = f"TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr"
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.scanner, "socat", inside, f"UNIX-CONNECT:{path}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.processes.append(process)  # type: ignore[arg-type]
        for port in ports:
            _wait_for(lambda p=port: self._listens(p), f"bridge of port {port}")

    def _listens(self, port: int) -> bool:
        out = run("ss", "-Hltn", f"sport = :{port}", netns=self.scanner)
        return bool(out.strip())

    def close(self) -> None:
        for process in self.processes:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            process.terminate()
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
            if process.stdout is not None:
                process.stdout.close()


def _wait_for(predicate: object, what: str, timeout: float = 15) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise RuntimeError(f"{what} not ready within {timeout}s")


def _loss_rule(percent: int) -> str:
    if not percent:
        return ""
    return (
        "add rule inet lab loss tcp flags & (syn | ack) == syn "
        f"numgen random mod 100 < {percent} drop\n"
    )


def _ruleset(spec: LabSpec) -> str:
    lines = [
        "table inet lab {",
        "  counter syns { }",
        "  chain loss { }",
        "  chain count {",
        "    type filter hook prerouting priority -300; policy accept;",
        '    tcp flags & (syn | ack) == syn counter name "syns"',
        "  }",
        "  chain input {",
        "    type filter hook input priority 0; policy accept;",
    ]
    lines += [
        f"    ip daddr {address} tcp dport {ports} drop" for address, ports in spec.filtered.items()
    ]
    lines += ["    jump loss", "  }", "}"]
    return "\n".join(lines) + "\n" + _loss_rule(spec.loss)


@contextlib.contextmanager
def lab(spec: LabSpec) -> Iterator[Lab]:
    """Build the lab, yield it, tear every namespace and process down afterwards."""
    n = next(_ids)
    pid = os.getpid()
    scanner, target = f"cybersec-lab-s-{pid}-{n}", f"cybersec-lab-t-{pid}-{n}"
    veth_s, veth_t = f"ls{pid % 100000}x{n}", f"lt{pid % 100000}x{n}"
    created: list[str] = []
    with tempfile.TemporaryDirectory(prefix=f"cybersec-lab-{pid}-{n}-") as workdir:
        the_lab = Lab(spec, scanner, target, Path(workdir))
        try:
            for name in (scanner, target):
                run("ip", "netns", "add", name)
                created.append(name)
                run("ip", "link", "set", "lo", "up", netns=name)
            run("ip", "link", "add", veth_s, "netns", scanner, "type", "veth", "peer", "name",
                veth_t, "netns", target)  # fmt: skip
            run("ip", "addr", "add", f"{SCANNER_LINK}/30", "dev", veth_s, netns=scanner)
            run("ip", "addr", "add", f"{TARGET_LINK}/30", "dev", veth_t, netns=target)
            run("ip", "link", "set", veth_s, "up", netns=scanner)
            run("ip", "link", "set", veth_t, "up", netns=target)
            run("ip", "route", "add", BLOCK, "via", TARGET_LINK, netns=scanner)
            run("sysctl", "-qw", "net.ipv4.ip_forward=0", netns=target)
            for address in {*spec.up, *spec.tarpits, *spec.filtered}:
                run("ip", "addr", "add", f"{address}/32", "dev", "lo", netns=target)
            the_lab.nft(_ruleset(spec))
            listeners = [f"{a}:{p}" for a, ports in spec.up.items() for p in ports]
            listeners += [f"{a}:{r}" for a, r in spec.tarpits.items()]
            if listeners:
                command = [sys.executable, "-m", "tests.support.lab_listen"]
                if spec.banner:
                    command += ["--banner", spec.banner]
                process = the_lab.spawn([*command, *listeners], target)
                assert process.stdout is not None
                if process.stdout.readline().strip() != "ready":
                    raise RuntimeError("the lab's listeners did not start")
            the_lab.assert_no_default_route()
            yield the_lab
        finally:
            the_lab.close()
            for name in created:
                subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)
