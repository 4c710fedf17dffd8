"""Port specifications ("22,80,8000-8100") and the priority tiers ports are scanned in."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # not at run time: a one-shot scan command pays for every import
    from collections.abc import Iterable, Sequence
    from typing import Final

MIN_PORT: Final = 1
MAX_PORT: Final = 65_535

TIERS: Final[tuple[tuple[str, tuple[int, ...]], ...]] = (
    ("critical", (21, 22, 23, 25, 80, 443, 3306, 3389, 5432, 8080, 8443)),
    ("high", (20, 53, 110, 143, 445, 1433, 1521, 3000, 5000, 8000, 27017)),
    ("medium", (135, 139, 389, 636, 1723, 2049, 5900, 6379, 9200, 11211)),
)
"""Named tiers in scan order; every port not listed belongs to the last tier, "low"."""
LOW_TIER: Final = "low"
TIER_OF: Final[dict[int, str]] = {port: name for name, ports in TIERS for port in ports}


class PortSpecError(ValueError):
    """A port specification that cannot be parsed or lies outside 1-65535."""


def parse_port_ranges(spec: str) -> list[tuple[int, int]]:
    """Parse ``"22,80,1000-2000"`` into sorted, merged, inclusive ``(low, high)`` ranges.

    Work is proportional to the spec's length, never to the ports its ranges cover: a spec
    that repeats ``1-65535`` five hundred times is five hundred ranges merged into one."""
    if not spec or not spec.strip():
        raise PortSpecError("port spec is empty")
    ranges: list[tuple[int, int]] = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            raise PortSpecError(f"empty item in port spec {_shown(spec)}")
        low_text, sep, high_text = part.partition("-")
        low = _port(low_text, spec)
        high = _port(high_text, spec) if sep else low
        if low > high:
            raise PortSpecError(f"range {_shown(part)} runs backwards")
        ranges.append((low, high))
    ranges.sort()
    merged = [ranges[0]]
    for low, high in ranges[1:]:
        last_low, last_high = merged[-1]
        if low <= last_high + 1:
            merged[-1] = (last_low, max(last_high, high))
        else:
            merged.append((low, high))
    return merged


def count_ports(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(high - low + 1 for low, high in ranges)


def parse_port_spec(spec: str) -> list[int]:
    """Parse ``"22,80,1000-2000"`` into a sorted list of distinct ports."""
    return [port for low, high in parse_port_ranges(spec) for port in range(low, high + 1)]


def _shown(text: str) -> str:
    """Text quoted in an error, cut short: a 4 KB spec is not echoed back whole."""
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _port(text: str, spec: str) -> int:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):  # isdigit alone admits "²" and "٨٠"
        raise PortSpecError(f"{_shown(text)} in {_shown(spec)} is not a port number")
    value = int(text)
    if not MIN_PORT <= value <= MAX_PORT:
        raise PortSpecError(f"port {value} is outside {MIN_PORT}-{MAX_PORT}")
    return value


def format_port_spec(ports: Iterable[int]) -> str:
    """The shortest spec naming exactly these ports: ``[1, 2, 3, 80]`` -> ``"1-3,80"``."""
    ordered = sorted(set(ports))
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)


def format_port_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    """The spec of merged ranges (as :func:`parse_port_ranges` returns them)."""
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in ranges)


def tier_of(port: int) -> str:
    return TIER_OF.get(port, LOW_TIER)


def order_by_tier(ports: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Split ports into (tier, ports) groups in scan order, dropping empty tiers."""
    wanted = set(ports)
    groups: list[tuple[str, list[int]]] = []
    for name, tier_ports in TIERS:
        chosen = [p for p in tier_ports if p in wanted]
        if chosen:
            groups.append((name, sorted(chosen)))
    rest = [p for p in sorted(wanted) if p not in TIER_OF]
    if rest:
        groups.append((LOW_TIER, rest))
    return groups
