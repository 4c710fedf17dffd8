"""One frozen settings object, read from ``CYBERSEC_*`` environment variables at process start."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.targets import MAX_HOSTS_LIMIT

CONSUMER_TIMEOUT_SECONDS = 1800
"""RabbitMQ's default consumer_timeout (30 minutes): a hard limit must end before it."""
ENV_PREFIX = "CYBERSEC_"

PLACEHOLDERS = frozenset(
    {
        "change-me",
        "changeme",
        "secret",
        "password",
        "dev",
        "dev-local-key",
        "cybersec",
        "guest",
        "replace-with-a-long-random-key-1",
        "replace-with-a-long-random-key-2",
    }
)
"""Every secret shipped in this repository's examples (env example, compose, chart values):
``production`` refuses them. tests/deploy checks that the examples hold no other."""


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


def is_placeholder(secret: str | None) -> bool:
    if not secret:
        return False
    text = secret.lower()
    return text in PLACEHOLDERS or "change-me" in text or text.startswith("replace-with")


class Settings(BaseSettings):
    """Everything a process of either service needs to know about its surroundings."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="ignore")

    environment: Literal["development", "production"] = "development"
    """``production`` refuses the well-known development credentials."""

    broker_url: str = "amqp://guest:guest@127.0.0.1:5672//"
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/cybersec"
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)

    queue_prefix: str = "cybersec"
    """Prefix of every queue name: lets two deployments (or test runs) share one broker."""
    redis_prefix: str = "cybersec:"
    """Prefix of every Redis key, the Celery result backend's included."""

    result_ttl: int = Field(default=86_400, ge=60)
    """Seconds a task's state stays in Redis; PostgreSQL keeps it after that."""
    publish_timeout: float = Field(default=5.0, gt=0)
    """Seconds the gateway waits for the broker's confirm before answering 503."""
    max_request_bytes: int = Field(default=65_536, ge=1024)
    max_ports: int = Field(default=65_535, ge=1, le=65_535)
    max_hosts: int = Field(default=256, ge=1, le=MAX_HOSTS_LIMIT)
    """Largest number of addresses one scan may cover (a /24 by default)."""
    max_concurrency: int = Field(default=5_000, ge=1, le=20_000)
    """Highest ``config.max_concurrent`` accepted; the request schema's own bound is 20000."""
    db_pool_size: int = Field(default=10, ge=1)
    worker_concurrency: int = Field(default=2, ge=1)
    """Scans a worker node runs at once: processes with ``prefork``, threads with ``threads``."""
    worker_pool: Literal["prefork", "threads"] = "prefork"
    """``prefork``: one scan per process. ``threads``: one process runs
    ``worker_concurrency`` scans at once on its one event loop (scans that wait on timeouts)."""
    shutdown_timeout: int = Field(default=20, ge=1, le=600)
    """Seconds a worker's soft shutdown lets running scans finish before requeueing them.
    systemd, supervisor, compose and Helm stop timeouts are set above this bound."""
    heartbeat_file: str = "/tmp/cybersec-worker.heartbeat"  # noqa: S108 - an emptyDir in k8s
    """File a worker touches every second; its age is the worker's liveness probe."""
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    """Worker's Prometheus port (0: off). The API serves ``/metrics`` on its own port."""
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "json"
    """Log lines as one JSON object each (for collectors), or ``text`` for a terminal."""

    api_keys: Annotated[tuple[str, ...], NoDecode] = ()
    """Comma-separated API keys registered (as hashes) at API start, e.g. from a k8s Secret."""
    target_allow: Annotated[tuple[str, ...], NoDecode] = ()
    """CIDRs, addresses, hostnames or ``*.domain`` wildcards lifted out of the default deny."""
    target_deny: Annotated[tuple[str, ...], NoDecode] = ()
    """CIDRs, addresses, hostnames or ``*.domain`` wildcards never scanned; deny wins."""
    rate_limit_per_minute: int = Field(default=60, ge=1)
    """Scan submissions one API key may make per minute."""
    max_active_scans: int = Field(default=10, ge=1)
    """Scans one API key may have queued or running at once."""
    max_scan_seconds: int = Field(default=1500, ge=5)
    """Soft time limit cap of one scan task; the hard limit is ``hard_limit_margin`` more. Keep
    the hard limit below RabbitMQ's consumer_timeout (30 min by default), which would otherwise
    close the channel of a worker still holding the unacknowledged message."""
    hard_limit_margin: int = Field(default=30, ge=10, le=600)
    """Seconds from a task's soft time limit to its hard one: the time its final writes get
    (retried while PostgreSQL is away, and ending 5 s before the hard limit) before the hard
    limit ends the process running it. With ``max_scan_seconds`` it must stay under RabbitMQ's
    consumer timeout (30 minutes by default)."""
    db_retry_seconds: float = Field(default=300.0, ge=1)
    """How long a worker keeps retrying a PostgreSQL write (backoff with jitter) before
    handing the task back for a later retry; the result is readable from Redis meanwhile."""
    shard_min_ports: int = Field(default=16_384, ge=1)
    """A scan of at least twice this many (address, port) probes is split into shards that
    run in parallel on several worker processes; each shard gets at least this many."""
    max_shards: int = Field(default=8, ge=1, le=256)
    """Most shards one scan is split into."""
    result_cache_ttl: int = Field(default=0, ge=0)
    """Seconds a completed scan answers identical submissions (same key, target, ports and
    config) instead of a new scan; 0 disables the cache, ``force: true`` bypasses it."""
    resolve_timeout: float = Field(default=3.0, gt=0)
    """Seconds the gateway and the worker wait for a hostname to resolve."""
    # Scan lifecycle on the worker (issue 14): sharded scans joined in PostgreSQL, the reaper.
    merge_time_limit: int = Field(default=120, ge=1)
    """Soft time limit (s) of a sharded scan's merge, which identifies services on the open
    ports the shards found; the hard limit is ``hard_limit_margin`` more. Past it the scan fails."""
    reap_interval: float = Field(default=60.0, gt=0)
    """Seconds between two passes of a worker's reaper, which fails scans left 'running' past
    their hard time limit plus the retry budget and frees their key's slot."""

    # --- hardening (issue 16): bounds an attacker with a valid key cannot switch off ---
    max_event_streams_per_key: int = Field(default=8, ge=1)
    """Event streams one API key may hold open at once, per API process (over: 429)."""
    max_event_streams: int = Field(default=200, ge=1, le=10_000)
    """Event streams one API process holds open at once (over: 429); they read Redis through
    a pool of their own this size, never the limiter's."""
    max_concurrent_lookups: int = Field(default=16, ge=1, le=1024)
    """Host-name lookups one API process runs at once; more wait within the resolve timeout."""
    auth_stale_seconds: float = Field(default=60.0, ge=0)
    """How long after its last check a key is still honoured while PostgreSQL is away."""
    critical_share: float = Field(default=0.25, gt=0, le=1)
    """Share of ``rate_limit_per_minute`` a key may submit with priority ``critical`` (at least
    one a minute; 1: no bound of its own)."""

    @property
    def critical_per_minute(self) -> int | None:
        if self.critical_share >= 1:
            return None
        return max(1, int(self.rate_limit_per_minute * self.critical_share))

    # --- schedules and webhooks (issue 17): the dispatcher's settings ---
    dispatcher_interval: float = Field(default=2.0, gt=0, le=60)
    """Seconds between two ticks of a dispatcher (due schedules, unsent messages, webhooks)."""
    webhook_allow_networks: Annotated[tuple[IPv4Network | IPv6Network, ...], NoDecode] = ()
    """CIDRs a webhook URL may resolve to besides global addresses (e.g. an internal receiver),
    parsed when the settings load. The target deny list and cloud metadata still win."""
    webhook_timeout: float = Field(default=10.0, gt=0, le=60)
    """Seconds one webhook delivery attempt may take, connect to last byte read."""
    webhook_max_response_bytes: int = Field(default=65_536, ge=0)
    """Most bytes of a receiver's answer read (and the first 1 KiB kept) per attempt."""
    webhook_retry_schedule: str = "5,300,1800,7200,18000,36000,36000"
    """Seconds between a failed delivery attempt and the next (the Standard Webhooks
    schedule); after the last, the message has failed."""
    webhook_disable_after: int = Field(default=432_000, ge=60)
    """Seconds an endpoint may fail every delivery before it is disabled (5 days)."""
    dispatcher_heartbeat_file: str = "/tmp/cybersec-dispatcher.heartbeat"  # noqa: S108
    """File a dispatcher touches after every tick that reached PostgreSQL (liveness probe)."""
    max_schedules_per_key: int = Field(default=100, ge=0)
    """Schedules one API key may have; their runs are not counted by the per-key rate limits."""
    max_webhooks_per_key: int = Field(default=20, ge=0)
    """Webhooks one API key may have."""

    @field_validator("webhook_allow_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list | tuple):
            networks: list[object] = []
            for item in value:
                try:
                    parsed = ip_network(item, strict=False) if isinstance(item, str) else item
                except ValueError:
                    raise ValueError(f"webhook_allow_networks: {item!r} is not a CIDR") from None
                networks.append(parsed)
            return tuple(networks)
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _delays(cls, value: str) -> str:
        try:
            delays = [float(part) for part in value.split(",")]
        except ValueError:
            raise ValueError("webhook_retry_schedule: comma-separated seconds") from None
        if not delays or any(d < 0 for d in delays):
            raise ValueError("webhook_retry_schedule: comma-separated seconds, none negative")
        return value

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        """``webhook_retry_schedule`` parsed (checked when the settings loaded); the sender
        reads it once. Not cached here: ``model_copy`` would carry a stale copy along."""
        return tuple(float(part) for part in self.webhook_retry_schedule.split(","))

    # Web dashboard (issue 18): the gateway's /ui pages and their session cookie.
    ui_session_seconds: int = Field(default=28_800, ge=60)
    """How long a dashboard sign-in lasts."""
    forwarded_allow_ips: str = "127.0.0.1"
    """Proxies (comma-separated addresses, or ``*``) whose X-Forwarded-Proto and -For the API
    trusts; the dashboard's cookie is ``Secure`` when such a proxy says the client used https."""

    # Network scanning (issue 15): pacing, timing floor and tarpit detection of the engine.
    probe_rate_ceiling: int = Field(default=0, ge=0)
    """Most probes per second one scan task (a scan, or one shard of a large one) sends,
    whatever its ``config.rate`` (0: no ceiling beyond the scan's own rate). A worker node
    running N tasks at once sends at most N times it. The gateway and the dispatcher read it
    too: a scan's time limits are computed at the capped rate."""
    probe_min_timeout: float = Field(default=0.1, gt=0, le=30)
    """Shortest per-host probe timeout, however fast the host answers (nmap -T4: 0.1 s)."""
    tarpit_min_open: int = Field(default=16, ge=1)
    """A host with at least this many open ports, open on 90% of the ports probed so far,
    is flagged as a tarpit and its services are not identified."""

    # Reserved critical capacity (issue 15, item 7): the critical queue's own worker node.
    critical_concurrency: int = Field(default=1, ge=1, le=64)
    """Processes of ``python -m worker_service --critical``, the node that consumes only the
    critical queue: capacity no low, normal or high scan can hold."""
    critical_metrics_port: int = Field(default=0, ge=0, le=65535)
    """Prometheus port of the critical node (0: off); the normal node keeps ``metrics_port``."""

    @field_validator("api_keys", "target_allow", "target_deny", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @model_validator(mode="after")
    def _hard_limit_under_the_consumer_timeout(self) -> Settings:
        longest = max(self.max_scan_seconds, self.merge_time_limit)
        if longest + self.hard_limit_margin >= CONSUMER_TIMEOUT_SECONDS:
            raise ValueError(
                "CYBERSEC_MAX_SCAN_SECONDS (and CYBERSEC_MERGE_TIME_LIMIT)"
                " + CYBERSEC_HARD_LIMIT_MARGIN must stay under"
                f" RabbitMQ's consumer timeout ({CONSUMER_TIMEOUT_SECONDS} s): a task past it"
                " has its channel closed and its message redelivered while it still runs"
            )
        return self

    @model_validator(mode="after")
    def _no_placeholders_in_production(self) -> Settings:
        if self.environment != "production":
            return self
        broker = urlsplit(self.broker_url)
        if broker.username == "guest" and broker.password == "guest":  # noqa: S105
            raise ValueError("CYBERSEC_BROKER_URL uses guest/guest; set real credentials")
        for name in ("broker_url", "redis_url", "database_url"):
            if is_placeholder(urlsplit(getattr(self, name)).password):
                raise ValueError(
                    f"CYBERSEC_{name.upper()} holds a placeholder password from the examples"
                )
        for key in self.api_keys:
            if len(key) < 24 or is_placeholder(key):
                raise ValueError("CYBERSEC_API_KEYS holds a placeholder or short key")
        return self

    @field_validator("queue_prefix")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value):
            raise ValueError("queue_prefix must be a non-empty name without spaces")
        return value

    def to_environ(self) -> dict[str, str]:
        """The ``CYBERSEC_*`` variables that make another process read exactly these settings."""
        environ = {}
        for name, value in self.model_dump().items():
            text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
            environ[f"{ENV_PREFIX}{name.upper()}"] = text
        return environ

    def child_environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """``base`` with its own ``CYBERSEC_*`` variables replaced by these settings."""
        environ = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
        environ.update(self.to_environ())
        return environ

    @property
    def scan_queue(self) -> str:
        return f"{self.queue_prefix}.scans"

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue_prefix}.scans.dead"

    @property
    def critical_queue(self) -> str:
        """Critical scans only (issue 15, item 7); see ``shared.protocol.queue_for``."""
        return f"{self.queue_prefix}.scans.critical"


def load_settings() -> Settings:
    """Read the environment once; call at process start and pass the result on."""
    return Settings()
