"""Request, task-payload and result models: the versioned data both services exchange."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from shared.ports import format_port_ranges, parse_port_ranges
from shared.targets import MAX_HOSTS_LIMIT, parse_target

Priority = Literal["low", "normal", "high", "critical"]
PortState = Literal["open", "closed", "filtered"]
EndedScanState = Literal["completed", "failed", "revoked"]
ScanState = Literal["queued", "running", EndedScanState]
TaskState = Literal["PENDING", "STARTED", "PROGRESS", "SUCCESS", "FAILURE", "RETRY", "REVOKED"]

PAYLOAD_VERSION: Literal[1] = 1
EXCLUDE_VERSION: Literal[2] = 2
"""The payload version that added ``exclude``."""

MAX_BANNER_CHARS = 512
"""A stored banner is cut to this; what a port sends first rarely needs more to be told."""
MAX_FIELD_CHARS = 128
"""Service, product, version and reason are cut to this."""
MAX_OPEN_PORTS_PER_HOST = 1024
"""Open ports listed per address; past it a host (one that accepts every port, say) is flagged
in ``capped_addresses`` and the rest are only counted in ``open_ports_omitted``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScanConfig(_Strict):
    scan_type: Literal["TCP"] = "TCP"
    timeout: float = Field(default=1.0, gt=0, le=30, description="Seconds per connect attempt")
    max_concurrent: int = Field(default=500, ge=1, le=20_000, description="Connects in flight")
    service_detection: bool = Field(
        default=True, description="Identify the service on each open port (banners, probes)"
    )
    discovery: bool | None = Field(
        default=None,
        description="Ping hosts (TCP 80/443, ICMP echo where allowed) and sweep only those up;"
        " false scans every address (nmap -Pn). Default: on when the target has several"
        " addresses",
    )
    retries: int = Field(
        default=2, ge=0, le=10, description="Retransmissions of an unanswered probe"
    )
    rate: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="Most probes per second this scan sends (capped by the worker's ceiling)",
    )


class ScanRequest(_Strict):
    target: str = Field(max_length=255, description="IP address, hostname or CIDR block")
    ports: str = Field(default="1-1000", max_length=4096, description='e.g. "22,80,8000-8100"')
    config: ScanConfig = Field(default_factory=ScanConfig)
    priority: Priority = "normal"
    force: bool = Field(
        default=False, description="Scan even when a cached result of the same scan exists"
    )

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        # Only the form here: the configured bound on networks is ParsedScan's to apply.
        return parse_target(value, max_hosts=MAX_HOSTS_LIMIT).value

    @field_validator("ports")
    @classmethod
    def _ports(cls, value: str) -> str:
        return format_port_ranges(parse_port_ranges(value))


class ScanTaskPayload(_Strict):
    """The single positional argument of the scan task, as it travels on the wire."""

    version: Literal[1, 2] = PAYLOAD_VERSION
    scan_id: UUID
    target: str
    ports: str
    config: ScanConfig
    priority: Priority
    exclude: tuple[str, ...] = Field(default=(), max_length=256)
    """Since version 2: addresses and CIDR blocks this scan must not touch (a schedule's
    exclusions), applied by the worker as deny entries (``TargetPolicy.excluding``)."""

    @model_validator(mode="after")
    def _exclude_needs_v2(self) -> ScanTaskPayload:
        if self.exclude and self.version < EXCLUDE_VERSION:
            raise ValueError(f"exclude needs payload version {EXCLUDE_VERSION}")
        return self

    @model_serializer(mode="wrap")
    def _omit_empty_exclude(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A payload without exclusions stays the version-1 message it always was.
        data: dict[str, Any] = handler(self)
        if not self.exclude:
            data.pop("exclude", None)
        return data


class PortResult(_Strict):
    port: int
    state: PortState
    address: str | None = None
    reason: str | None = None
    service: str | None = None
    banner: str | None = None
    product: str | None = None
    version: str | None = None

    @field_validator("reason", "service", "product", "version", mode="before")
    @classmethod
    def _cap_field(cls, value: object) -> object:
        return value[:MAX_FIELD_CHARS] if isinstance(value, str) else value

    @field_validator("banner", mode="before")
    @classmethod
    def _cap_banner(cls, value: object) -> object:
        return value[:MAX_BANNER_CHARS] if isinstance(value, str) else value


class HostResult(_Strict):
    """What one address of the target turned out to be."""

    address: str
    state: Literal["up", "down"]
    reason: str = Field(
        description="syn-ack, reset or echo-reply (up), no-response or an ICMP error (down),"
        " user-set (discovery off)"
    )
    rtt_ms: float | None = None
    probes: int = 0
    retransmissions: int = 0
    unresponsive: bool = Field(default=False, description="Up, yet no port probe got any answer")
    tarpit: bool = Field(
        default=False,
        description="Answers on (nearly) every port: its open ports are listed, services not"
        " identified",
    )


class ScanResult(_Strict):
    scan_id: UUID
    target: str
    addresses: list[str] = Field(default_factory=list)
    ports: str
    total_ports_scanned: int
    open_ports: list[PortResult]
    closed_ports: int = 0
    filtered_ports: int = 0
    status: Literal["completed", "revoked"] = "completed"
    progress: int = 100
    started_at: datetime
    finished_at: datetime
    duration_seconds: float
    shards: int = 1
    hosts: list[HostResult] = Field(default_factory=list)
    probes_sent: int = 0
    retransmissions: int = 0
    capped_addresses: list[str] = Field(default_factory=list)
    """Addresses with more than ``MAX_OPEN_PORTS_PER_HOST`` open ports: only that many listed."""
    open_ports_omitted: int = 0
    """Open ports found but not listed, over the per-address cap."""

    @model_validator(mode="before")
    @classmethod
    def _cap_open_ports(cls, data: object) -> object:
        if not isinstance(data, dict) or not isinstance(data.get("open_ports"), list):
            return data
        kept: list[object] = []
        per_address: dict[object, int] = {}
        capped: list[str] = list(data.get("capped_addresses") or [])
        omitted = 0
        for port in data["open_ports"]:
            address = (
                port.get("address") if isinstance(port, dict) else getattr(port, "address", None)
            )
            seen = per_address.get(address, 0)
            if seen >= MAX_OPEN_PORTS_PER_HOST:
                omitted += 1
                if str(address) not in capped:
                    capped.append(str(address))
                continue
            per_address[address] = seen + 1
            kept.append(port)
        if not omitted:
            return data
        return {
            **data,
            "open_ports": kept,
            "capped_addresses": capped,
            "open_ports_omitted": int(data.get("open_ports_omitted") or 0) + omitted,
        }


class ScanProgress(_Strict):
    """The ``meta`` of a PROGRESS state update."""

    status: str
    progress: int = Field(ge=0, le=100)
    tier: str | None = None
    ports_scanned: int = 0
    total_ports: int = 0
    open_ports: list[int] = Field(default_factory=list)


class ScanAccepted(_Strict):
    task_id: UUID
    scan_id: UUID
    status: Literal["queued"] = "queued"
    message: str


class ScanCached(_Strict):
    """Answer to a submission identical to a scan completed within the cache TTL."""

    task_id: UUID
    scan_id: UUID
    status: Literal["completed"] = "completed"
    cached: Literal[True] = True
    cached_at: datetime
    message: str
    result: ScanResult


class ScanStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: UUID
    scan_id: UUID
    state: TaskState
    status: str
    progress: int = 0
    tier: str | None = None
    ports_scanned: int | None = None
    total_ports: int | None = None
    open_ports_found: list[int] | None = None
    result: ScanResult | None = None
    error: str | None = None
    created_at: datetime | None = None


class ScanSummary(_Strict):
    task_id: UUID
    scan_id: UUID
    target: str
    ports: str
    priority: Priority
    state: ScanState
    created_at: datetime
    finished_at: datetime | None = None
    open_ports: int | None = None
    error: str | None = None
    schedule_id: UUID | None = Field(default=None, description="The schedule that made it, if any")


class ScanPage(_Strict):
    items: list[ScanSummary]
    next_cursor: str | None = None
