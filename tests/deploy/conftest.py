"""Shared pieces of the deploy/ and helm/ tests: paths, the settings contract, probe runners."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from shared.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "helm" / "cybersec-scan"

SETTINGS_ENV = frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields)
"""Every variable the services read, derived from the settings model so new fields are covered."""
URL_ENV = frozenset({"CYBERSEC_BROKER_URL", "CYBERSEC_REDIS_URL", "CYBERSEC_DATABASE_URL"})
API_ONLY_ENV = frozenset({"CYBERSEC_API_KEYS"})
"""Secrets only the gateway uses: the workers, which talk to arbitrary hosts, never get them."""
SHUTDOWN_BOUND_DEFAULT = Settings.model_fields["shutdown_timeout"].default


def load_settings(monkeypatch: pytest.MonkeyPatch, env: Mapping[str, str]) -> Settings:
    """Settings as a process started with exactly these CYBERSEC_* variables would read them."""
    for name in os.environ:
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


REAL_PASSWORD = "9Lq2v-a-real-password"  # noqa: S105 - what a test fills in


def real_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with the shipped placeholder password replaced, as an operator would."""
    return {name: value.replace("change-me", REAL_PASSWORD) for name, value in env.items()}


def heartbeat_probe_exit_codes(command: Sequence[str], tmp_path: Path) -> tuple[int, int, int]:
    """Run a heartbeat probe command (``python -c ...``) against a fresh, a stale and a missing
    heartbeat file; return the three exit codes."""
    assert command[0] == "python", command
    argv = [sys.executable, *command[1:]]
    heartbeat = tmp_path / "heartbeat"
    env = {**os.environ, "CYBERSEC_HEARTBEAT_FILE": str(heartbeat)}

    def run() -> int:
        return subprocess.run(
            argv, env=env, capture_output=True, timeout=30, check=False
        ).returncode

    heartbeat.touch()
    fresh = run()
    stale_time = time.time() - 600
    os.utime(heartbeat, (stale_time, stale_time))
    stale = run()
    heartbeat.unlink()
    missing = run()
    return fresh, stale, missing
