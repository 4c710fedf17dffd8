"""Run the scan engine once and print its findings as JSON: the engine as a command, like nmap.

``python -m bench.engine_cli 127.0.0.1 1-65535 --timeout 1 --concurrency 1000``
prints ``{"seconds": ..., "open": [...], "notable": {port: [state, reason]}, "refused": n}``
where ``seconds`` is the time spent inside the engine alone. By default it calls the blocking
entry point ``scan_blocking``; ``--asyncio`` goes through ``scan_host`` on an event loop, as the
worker does, and pays asyncio's import time on top.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("address")
    parser.add_argument("ports")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--asyncio", action="store_true", help="scan through scan_host")
    args = parser.parse_args()
    ports = parse_port_spec(args.ports)
    if args.asyncio:
        import asyncio

        started = time.perf_counter()
        coro = scan_host(args.address, ports, timeout=args.timeout, concurrency=args.concurrency)
        outcomes = asyncio.run(coro)
    else:
        started = time.perf_counter()
        outcomes = scan_blocking(
            args.address, ports, timeout=args.timeout, concurrency=args.concurrency
        )
    print(json.dumps(report(outcomes, time.perf_counter() - started)))


if __name__ == "__main__":
    main()
