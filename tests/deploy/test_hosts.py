"""Running on hosts: the systemd units, the supervisor programs, the env file, the image."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import ValidationError

from shared.settings import is_placeholder
from tests import needs

from .conftest import (
    DEPLOY,
    REAL_PASSWORD,
    ROOT,
    SETTINGS_ENV,
    SHUTDOWN_BOUND_DEFAULT,
    URL_ENV,
    load_settings,
)

UNITS = DEPLOY / "systemd"
ENV_FILE = "/etc/cybersec/cybersec.env"
SERVICES = {
    "api": "api_service",
    "worker": "worker_service",
    "worker-critical": "worker_service --critical",
}

Unit = dict[str, dict[str, list[str]]]


def parse_unit(path: Path) -> Unit:
    """A unit file's sections and keys; systemd allows a key more than once."""
    unit: Unit = {}
    section: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = unit.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key, []).append(value)
    return unit


def env_example() -> dict[str, str]:
    env = {}
    for raw in (DEPLOY / "cybersec.env.example").read_text().splitlines():
        if raw.strip() and not raw.startswith("#"):
            key, _, value = raw.partition("=")
            env[key] = value.strip("'")
    return env


def shutdown_bound() -> int:
    return int(env_example().get("CYBERSEC_SHUTDOWN_TIMEOUT", SHUTDOWN_BOUND_DEFAULT))


def test_env_example_holds_only_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_example()
    assert set(env) <= SETTINGS_ENV, f"not settings: {sorted(set(env) - SETTINGS_ENV)}"
    assert set(env) >= URL_ENV
    # The worker unit sets it; EnvironmentFile= would override the unit's Environment=.
    assert "CYBERSEC_HEARTBEAT_FILE" not in env
    # As shipped, the example is refused: its passwords and keys are placeholders.
    with pytest.raises(ValidationError, match="placeholder"):
        load_settings(monkeypatch, env)
    filled = {name: _fill_in(value) for name, value in env.items()}
    settings = load_settings(monkeypatch, filled)
    assert settings.environment == "production"


def _fill_in(value: str) -> str:
    """What an operator writes over the example's placeholders."""
    value = value.replace("change-me", REAL_PASSWORD)
    if value.startswith("replace-with"):
        return ",".join(f"cs_{'x' * 30}{n}" for n in range(2))
    return value


def example_secrets() -> list[str]:
    """Every password and API key shipped in the env example, compose and the chart values."""
    found: list[str] = []
    env = env_example()
    found += env["CYBERSEC_API_KEYS"].split(",")
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    chart = yaml.safe_load((ROOT / "helm" / "cybersec-scan" / "values.yaml").read_text())
    urls = [value for name, value in env.items() if name.endswith("_URL")]
    for service in compose["services"].values():
        environment = service.get("environment") or {}
        if isinstance(environment, dict):
            urls += [str(v) for k, v in environment.items() if k.endswith("_URL")]
            found += [
                str(v) for k, v in environment.items() if "PASSWORD" in k or k.endswith("KEYS")
            ]
        urls += [arg.partition("=")[2] for arg in service.get("command") or [] if "://" in arg]
    urls += [str(value) for name, value in chart["secrets"].items() if name.endswith("Url")]
    found += [str(key) for key in chart["secrets"]["apiKeys"]]
    found += [urlsplit(url).password or "" for url in urls]
    return [secret for secret in found if secret]


def test_every_shipped_secret_is_refused_in_production() -> None:
    secrets = example_secrets()
    assert {"change-me", "replace-with-a-long-random-key-1"} <= set(secrets)
    assert [s for s in secrets if not is_placeholder(s)] == []


@pytest.mark.parametrize("name", ["api", "worker", "worker-critical", "dispatcher"])
def test_service_units(name: str) -> None:
    service = parse_unit(UNITS / f"cybersec-{name}.service")["Service"]

    def one(key: str) -> str:
        [value] = service[key]
        return value

    assert one("Type") in {"exec", "simple"}
    assert one("EnvironmentFile") == ENV_FILE
    assert one("User") == "cybersec"
    module = {**SERVICES, "dispatcher": "api_service.dispatcher"}[name]
    assert one("ExecStart").endswith(f"/bin/python -m {module}")
    assert one("KillSignal") == "SIGTERM"
    # SIGTERM to the main process only: Celery's pool processes must not die under their scans.
    assert one("KillMode") == "mixed"
    assert int(one("TimeoutStopSec")) >= shutdown_bound() + 5
    assert one("Restart") == "on-failure"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert one(key) == value, key


@pytest.mark.parametrize("name", ["worker", "worker-critical"])
def test_worker_heartbeat_is_writable(name: str) -> None:
    service = parse_unit(UNITS / f"cybersec-{name}.service")["Service"]
    [runtime_directory] = service["RuntimeDirectory"]
    [heartbeat] = [
        value.partition("=")[2]
        for value in service["Environment"]
        if value.startswith("CYBERSEC_HEARTBEAT_FILE=")
    ]
    assert heartbeat.startswith(f"/run/{runtime_directory}/")


def test_migrate_unit_runs_once_before_the_services() -> None:
    service = parse_unit(UNITS / "cybersec-migrate.service")["Service"]
    assert service["Type"] == ["oneshot"]
    assert service["ExecStart"][0].endswith("/bin/cybersec migrate")
    for name in SERVICES:
        unit = parse_unit(UNITS / f"cybersec-{name}.service")["Unit"]
        assert "cybersec-migrate.service" in unit["After"][0].split()
        assert "cybersec-migrate.service" in unit["Wants"][0].split()


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    needs.tool("systemd-analyze")
    # verify insists that ExecStart's binary exists: point the units at this venv.
    units = []
    for path in sorted(UNITS.glob("*.service")):
        copy = tmp_path / path.name
        copy.write_text(path.read_text().replace("/opt/cybersec/venv", sys.prefix))
        units.append(str(copy))
    verify = subprocess.run(
        ["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60
    )
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    for unit in units:
        security = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", "--threshold=30", unit],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert security.returncode == 0, security.stdout[-2000:]


def test_supervisor_programs() -> None:
    parser = configparser.RawConfigParser(strict=True)
    parser.read(DEPLOY / "supervisor" / "cybersec.conf")
    programs = [name for name in parser.sections() if name.startswith("program:")]
    assert programs == [
        "program:cybersec-api",
        "program:cybersec-worker",
        "program:cybersec-worker-critical",
        "program:cybersec-dispatcher",
    ]
    group = parser["group:cybersec"]["programs"].split(",")
    assert group == [name.removeprefix("program:") for name in programs]
    for name, module in {**SERVICES, "dispatcher": "api_service.dispatcher"}.items():
        program = parser[f"program:cybersec-{name}"]
        assert program["user"] == "cybersec"
        command = program["command"]
        assert f". {ENV_FILE};" in command
        assert re.search(rf"exec \S+/bin/python -m {module}'$", command), command
        assert program["stopsignal"] == "TERM"
        assert int(program["stopwaitsecs"]) >= shutdown_bound() + 5
        assert program.getboolean("killasgroup") is True
    assert parser["program:cybersec-api"].getboolean("stopasgroup") is True
    # TERM to the whole group would kill Celery's pool processes under their running scans.
    for worker in ("cybersec-worker", "cybersec-worker-critical"):
        assert parser[f"program:{worker}"].getboolean("stopasgroup") is False


def test_image_runs_unprivileged_without_build_tools() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", dockerfile, flags=re.MULTILINE)[1:]
    assert len(stages) == 2
    runtime = stages[-1]
    assert runtime.startswith("${PYTHON_IMAGE} AS runtime")
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in dockerfile
    assert "USER 10001:10001" in runtime
    assert "--uid 10001" in runtime
    assert re.search(r"^ENTRYPOINT \[.*\]$", runtime, flags=re.MULTILINE)
    assert 'CMD ["python", "-m", "api_service"]' in runtime
    for tool in ("gcc", "build-essential", "pip install"):
        assert tool not in runtime
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    for package in ("shared/", "api_service/", "worker_service/", "cybersec_cli/"):
        assert f"!{package}" in ignored
