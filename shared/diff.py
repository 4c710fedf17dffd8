"""What changed between two scans: ports that opened, ports that stopped being open, services
that changed.

Ports are matched by (address, port). A port open in the old scan that the new scan did not
cover (another port spec, another address) is reported as ``not_rescanned``, never as closed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from datetime import datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict

from shared.ports import PortSpecError, parse_port_spec
from shared.schemas import PortResult, ScanResult

ServiceField = Literal["service", "product", "version"]
SERVICE_FIELDS: tuple[ServiceField, ...] = ("service", "product", "version")


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScanRef(_Frozen):
    """One side of a diff."""

    scan_id: UUID
    task_id: UUID | None = None
    target: str
    ports: str
    started_at: datetime
    finished_at: datetime


class ServiceChange(_Frozen):
    """A port open in both scans whose service, product or version differs."""

    address: str
    port: int
    changed: list[ServiceField]
    before: PortResult
    after: PortResult


class ScanDiff(_Frozen):
    old: ScanRef
    new: ScanRef
    newly_open: list[PortResult]
    """Open now, not open (or not scanned) before; each with its address filled in."""
    newly_closed: list[PortResult]
    """Open before, scanned again and no longer open; as they were in the old scan."""
    changed: list[ServiceChange]
    not_rescanned: list[PortResult]
    """Open before, outside the new scan's addresses or ports: their state now is unknown."""
    unchanged: int
    """Ports open in both scans with the same service, product and version."""

    @property
    def has_changes(self) -> bool:
        return bool(self.newly_open or self.newly_closed or self.changed)


def diff_results(
    old: ScanResult,
    new: ScanResult,
    *,
    old_task_id: UUID | None = None,
    new_task_id: UUID | None = None,
) -> ScanDiff:
    """Compare two finished scans, normally of the same target, ``old`` first."""
    before = _open_by_key(old)
    after = _open_by_key(new)
    covered = _coverage(new)

    newly_open = [after[key] for key in sorted(after.keys() - before.keys(), key=_sort_key)]
    newly_closed: list[PortResult] = []
    not_rescanned: list[PortResult] = []
    for key in sorted(before.keys() - after.keys(), key=_sort_key):
        (newly_closed if covered(key) else not_rescanned).append(before[key])
    changed: list[ServiceChange] = []
    unchanged = 0
    for key in sorted(before.keys() & after.keys(), key=_sort_key):
        fields = [f for f in SERVICE_FIELDS if getattr(before[key], f) != getattr(after[key], f)]
        if fields:
            changed.append(
                ServiceChange(
                    address=key[0],
                    port=key[1],
                    changed=fields,
                    before=before[key],
                    after=after[key],
                )
            )
        else:
            unchanged += 1
    return ScanDiff(
        old=_ref(old, old_task_id),
        new=_ref(new, new_task_id),
        newly_open=newly_open,
        newly_closed=newly_closed,
        changed=changed,
        not_rescanned=not_rescanned,
        unchanged=unchanged,
    )


def _ref(result: ScanResult, task_id: UUID | None) -> ScanRef:
    return ScanRef(
        scan_id=result.scan_id,
        task_id=task_id,
        target=result.target,
        ports=result.ports,
        started_at=result.started_at,
        finished_at=result.finished_at,
    )


def _default_address(result: ScanResult) -> str:
    return result.addresses[0] if len(result.addresses) == 1 else result.target


def _open_by_key(result: ScanResult) -> dict[tuple[str, int], PortResult]:
    """Open ports keyed by (address, port); a port without an address gets the scan's one."""
    default = _default_address(result)
    ports: dict[tuple[str, int], PortResult] = {}
    for port in result.open_ports:
        if port.state != "open":
            continue
        address = port.address or default
        ports[(address, port.port)] = (
            port if port.address else port.model_copy(update={"address": address})
        )
    return ports


def _coverage(result: ScanResult) -> Callable[[tuple[str, int]], bool]:
    """Whether an (address, port) lay inside a scan; what cannot be known counts as inside."""
    try:
        ports: frozenset[int] | None = frozenset(parse_port_spec(result.ports))
    except PortSpecError:
        ports = None
    addresses = {*result.addresses, _default_address(result)} if result.addresses else None

    def covered(key: tuple[str, int]) -> bool:
        address, port = key
        in_ports = ports is None or port in ports
        return in_ports and (addresses is None or address in addresses)

    return covered


def _sort_key(key: tuple[str, int]) -> tuple[int, int, str, int]:
    address, port = key
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (9, 0, address, port)
    return (ip.version, int(ip), "", port)
