"""Run the scan engine once and print its findings: the engine as a command, like nmap.

``python -S bench/engine_cli.py 127.0.0.1 1-65535 --timeout 1 --concurrency 1000`` prints a
Python literal (read it with ``ast.literal_eval``), ``{"seconds": ..., "open": [...],
"notable": {port: (state, reason)}, "refused": n}``, where ``seconds`` is the time spent inside
the engine alone. By default it calls the blocking core ``worker_service.probe.tiers.sweep_tiers``
(the same tiers, sweeps and probe processes a worker runs); ``--asyncio`` goes through
``runner.scan_host`` on an event loop, as the worker does, and pays asyncio's import time.
A literal, not JSON: importing ``json`` (and ``re`` with it) costs more than sweeping the
first thousand ports.
"""

from __future__ import annotations

import sys
import time

if __package__ in (None, ""):
    # Run as a file (``python -S bench/engine_cli.py``), which skips runpy's start-up cost.
    sys.path.insert(0, str(__file__).rsplit("/bench/", 1)[0])

from shared.ports import parse_port_spec
from worker_service.probe.tiers import Sweep, sweep_tiers

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

    from worker_service.probe.sweep import Outcome


def report(
    scanned: Sequence[int], notable: dict[int, Outcome], seconds: float
) -> dict[str, object]:
    shown = {port: outcome for port, outcome in notable.items() if outcome[1] != "conn-refused"}
    return {
        "seconds": seconds,
        "open": [port for port in scanned if notable.get(port, ("closed",))[0] == "open"],
        "notable": shown,
        "refused": len(scanned) - len(shown),
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

        from worker_service.probe.runner import scan_host

        started = time.perf_counter()
        coro = scan_host(address, ports, timeout=timeout, concurrency=concurrency)
        outcomes = asyncio.run(coro)
        scanned = [o.port for o in outcomes]
        notable = {o.port: (str(o.state), o.reason) for o in outcomes}
    else:
        started = time.perf_counter()
        how = Sweep(timeout=timeout, concurrency=concurrency)
        pairs, _stats = sweep_tiers([address], ports, how)
        scanned, notable = ports, {port: outcome for (_a, port), outcome in pairs.items()}
    print(repr(report(scanned, notable, time.perf_counter() - started)))


if __name__ == "__main__":
    main()
