"""Run the scan engine once and print its findings as JSON: the engine as a command, like nmap.

``python -S bench/engine_cli.py 127.0.0.1 1-65535 --timeout 1 --concurrency 1000`` (or ``-m``)
prints ``{"seconds": ..., "open": [...], "notable": {port: [state, reason]}, "refused": n}``
where ``seconds`` is the time spent inside the engine alone. By default it calls the blocking
entry point ``scan_blocking``; ``--asyncio`` goes through ``scan_host`` on an event loop, as the
worker does, and pays asyncio's import time on top.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence

if __package__ in (None, ""):
    # Run as a file (``python -S bench/engine_cli.py``), which skips runpy's start-up cost.
    sys.path.insert(0, str(__file__).rsplit("/bench/", 1)[0])

from shared.ports import parse_port_spec
from worker_service.scanner import PortOutcome, scan_blocking, scan_host


def report(outcomes: Sequence[PortOutcome], seconds: float) -> dict[str, object]:
    notable = {o.port: [o.state, o.reason] for o in outcomes if o.reason != "conn-refused"}
    return {
        "seconds": seconds,
        "open": [o.port for o in outcomes if o.state == "open"],
        "notable": notable,
        "refused": len(outcomes) - len(notable),
    }


USAGE = "usage: engine_cli ADDRESS PORTS [--timeout S] [--concurrency N] [--asyncio]"


def parse_args(argv: Sequence[str]) -> tuple[str, str, float, int, bool]:
    """By hand, not argparse: its import alone costs a one-shot scan ~5 ms of start-up."""
    positional: list[str] = []
    timeout, concurrency, use_asyncio = 1.0, 1000, False
    items = iter(argv)
    for item in items:
        if item == "--timeout":
            timeout = float(next(items))
        elif item == "--concurrency":
            concurrency = int(next(items))
        elif item == "--asyncio":
            use_asyncio = True
        elif item.startswith("-"):
            raise SystemExit(USAGE)
        else:
            positional.append(item)
    if len(positional) != 2:
        raise SystemExit(USAGE)
    return positional[0], positional[1], timeout, concurrency, use_asyncio


def main() -> None:
    address, spec, timeout, concurrency, use_asyncio = parse_args(sys.argv[1:])
    ports = parse_port_spec(spec)
    if use_asyncio:
        import asyncio

        started = time.perf_counter()
        coro = scan_host(address, ports, timeout=timeout, concurrency=concurrency)
        outcomes = asyncio.run(coro)
    else:
        started = time.perf_counter()
        outcomes = scan_blocking(address, ports, timeout=timeout, concurrency=concurrency)
    print(json.dumps(report(outcomes, time.perf_counter() - started)))


if __name__ == "__main__":
    main()
