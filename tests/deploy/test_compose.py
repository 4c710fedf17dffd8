"""deploy/docker-compose.yml, checked statically: no docker engine here."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.errors import TargetDenied
from shared.policy import TargetPolicy
from worker_service.__main__ import critical_node

from .conftest import (
    DEPLOY,
    SETTINGS_ENV,
    URL_ENV,
    heartbeat_probe_exit_codes,
    load_settings,
)

OURS = ("migrate", "api", "worker", "worker-critical", "dispatcher")
LONG_RUNNING = (
    "rabbitmq",
    "redis",
    "postgres",
    "api",
    "worker",
    "worker-critical",
    "dispatcher",
    "flower",
)


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    found: dict[str, Any] = compose["services"]
    return found


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(?:(\d+)m)?(?:(\d+)s)?", duration)
    assert duration
    assert match, duration
    return int(match[1] or 0) * 60 + int(match[2] or 0)


def test_the_whole_stack_is_there(services: dict[str, Any]) -> None:
    assert set(services) == {*LONG_RUNNING, "migrate"}
    assert services["rabbitmq"]["image"] == "rabbitmq:3-management"
    assert services["flower"]["image"].startswith("mher/flower")
    flower_command = " ".join(services["flower"]["command"])
    assert "--broker=amqp://" in flower_command
    assert "rabbitmq:15672/api/" in flower_command
    images = {services[name]["image"] for name in OURS}
    assert len(images) == 1, "one image for both services and the migrations"
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile"


@pytest.mark.parametrize("name", OURS)
def test_our_services_read_only_their_settings(
    services: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {key: str(value) for key, value in services[name]["environment"].items()}
    assert set(env) <= SETTINGS_ENV, f"not settings: {sorted(set(env) - SETTINGS_ENV)}"
    assert set(env) >= URL_ENV
    settings = load_settings(monkeypatch, env)
    assert settings.environment == "development"
    if name != "migrate":
        assert "rabbitmq:5672" in settings.broker_url
        assert "@postgres:5432/" in settings.database_url


def test_only_the_api_gets_api_keys(services: dict[str, Any]) -> None:
    holders = {name for name in OURS if "CYBERSEC_API_KEYS" in services[name]["environment"]}
    assert holders == {"api"}


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_have_healthchecks(services: dict[str, Any], name: str) -> None:
    test = services[name]["healthcheck"]["test"]
    assert test[0] == "CMD"


def test_start_order_waits_for_health_and_migrations(services: dict[str, Any]) -> None:
    assert services["migrate"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert services["migrate"]["command"] == ["cybersec", "migrate"]
    for name in ("api", "worker", "worker-critical", "dispatcher"):
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"] == {"condition": "service_completed_successfully"}
        for backend in ("rabbitmq", "redis", "postgres"):
            assert depends_on[backend] == {"condition": "service_healthy"}


def test_worker_scales_and_stops_within_grace(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = services["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker
    env = {key: str(value) for key, value in worker["environment"].items()}
    bound = load_settings(monkeypatch, env).shutdown_timeout
    assert seconds(worker["stop_grace_period"]) >= bound + 5
    assert worker["command"] == ["python", "-m", "worker_service"]


def test_worker_healthcheck_is_heartbeat_age(services: dict[str, Any], tmp_path: Path) -> None:
    command = services["worker"]["healthcheck"]["test"][1:]
    assert "CYBERSEC_HEARTBEAT_FILE" in command[-1]
    assert heartbeat_probe_exit_codes(command, tmp_path) == (0, 1, 1)


def test_reserved_critical_node(
    services: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Issue 15: a node of its own on the critical queue, stopped like the workers, whose
    healthcheck reads the heartbeat file that node writes."""
    node = services["worker-critical"]
    assert node["command"] == ["python", "-m", "worker_service", "--critical"]
    assert "container_name" not in node
    assert "ports" not in node
    env = {key: str(value) for key, value in node["environment"].items()}
    settings = load_settings(monkeypatch, env)
    assert seconds(node["stop_grace_period"]) >= settings.shutdown_timeout + 5
    heartbeat = Path(critical_node(settings)[0].heartbeat_file)
    assert heartbeat.name == f"{Path(settings.heartbeat_file).name}.critical"
    command = node["healthcheck"]["test"][1:]
    written = tmp_path / "heartbeat.critical"
    probe_env = {**os.environ, "CYBERSEC_HEARTBEAT_FILE": str(tmp_path / "heartbeat")}

    def probe() -> int:
        argv = [sys.executable, *command[1:]]
        return subprocess.run(argv, env=probe_env, timeout=30, check=False).returncode

    written.touch()
    assert probe() == 0
    written.unlink()
    assert probe() == 1


def test_our_containers_run_unprivileged(services: dict[str, Any]) -> None:
    for name in OURS:
        service = services[name]
        assert service["user"] == "10001:10001"
        assert service["read_only"] is True
        assert service["cap_drop"] == ["ALL"]
        assert "/tmp" in service["tmpfs"]  # noqa: S108 - a tmpfs: the root is read-only


def test_no_unescaped_interpolation() -> None:
    text = (DEPLOY / "docker-compose.yml").read_text()
    assert re.search(r"(?<!\$)\$(?!\$)", text) is None, "compose would interpolate a bare $"


def test_the_stack_never_scans_its_own_network(services: dict[str, Any]) -> None:
    """Before, a scan from compose could reach RabbitMQ, Redis and PostgreSQL by address."""
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    [subnet] = [c["subnet"] for c in compose["networks"]["default"]["ipam"]["config"]]
    for name in ("api", "worker", "worker-critical"):
        deny = services[name]["environment"]["CYBERSEC_TARGET_DENY"].split(",")
        assert subnet in deny
        policy = TargetPolicy(deny=deny, own=())
        for address in list(ipaddress.ip_network(subnet).hosts())[:4]:
            with pytest.raises(TargetDenied):
                policy.check_address(str(address))
