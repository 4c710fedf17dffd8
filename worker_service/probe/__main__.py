"""The engine as a command, for a lab or a shell: discovery, then the sweep; JSON on stdout.

``python -m worker_service.probe 198.19.0.0/28 1-1000 '{"retries": 2, "rate": 5000}'`` prints
``{"seconds", "hosts": [...], "open": [[address, port], ...], "filtered": [[address, port,
reason], ...], "closed": n, "probes", "retransmissions"}``. The target is one address or a CIDR
block (no hostnames, no policy: the worker applies those); the config is a ``ScanConfig``.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time

from shared.ports import parse_port_spec
from shared.schemas import ScanConfig
from worker_service.probe.runner import ProbeLimits, scan_hosts_blocking


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    network = ipaddress.ip_network(argv[0], strict=False)
    addresses = [str(a) for a in (network.hosts() if network.num_addresses > 2 else network)]
    ports = parse_port_spec(argv[1])
    config = ScanConfig.model_validate_json(argv[2] if len(argv) == 3 else "{}")
    started = time.monotonic()
    found = scan_hosts_blocking(addresses, ports, config, limits=ProbeLimits())
    seconds = time.monotonic() - started
    report = {
        "seconds": round(seconds, 4),
        "hosts": [host._asdict() for host in found.hosts],
        "open": [
            [a, o.port] for a, outs in found.outcomes.items() for o in outs if o.state == "open"
        ],
        "filtered": [
            [a, o.port, o.reason]
            for a, outs in found.outcomes.items()
            for o in outs
            if o.state == "filtered"
        ],
        "closed": sum(o.state == "closed" for outs in found.outcomes.values() for o in outs),
        "probes": found.probes,
        "retransmissions": found.retransmissions,
    }
    json.dump(report, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
