"""The whole service on the lab: the API on this host, a real worker inside the scanner
namespace (PostgreSQL, Redis and RabbitMQ bridged in with socat), a /28 with live, dropped,
filtering and tarpit hosts."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.settings import Settings
from tests.conftest import auth, wait_final
from tests.support.lab import LabSpec
from tests.support.lab_service import lab_service

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

LIVE, TARPIT = "198.19.0.10", "198.19.0.11"
SPEC = LabSpec(
    up={LIVE: [22, 80]},
    tarpits={TARPIT: "1-100"},
    filtered={LIVE: "70-79"},
    banner="SSH-2.0-OpenSSH_9.6\\r\\n",
)


@pytest.fixture(scope="module")
def lab_api(settings: Settings, run_dir: Path, database: str) -> Iterator[str]:
    with lab_service(SPEC, settings, run_dir, "lab") as url:
        yield url


def test_a_network_scan_through_the_service(lab_api: str, api_key: str) -> None:
    with httpx.Client(base_url=lab_api, headers=auth(api_key), timeout=10) as client:
        response = client.post(
            "/api/scan",
            json={"target": "198.19.0.8/29", "ports": "1-100", "config": {"timeout": 1}},
        )
        assert response.status_code == 202, response.text
        body = wait_final(client, response.json()["task_id"], timeout=60)
    assert body["state"] == "SUCCESS", body
    result = body["result"]
    hosts = {host["address"]: host for host in result["hosts"]}
    assert {a for a, h in hosts.items() if h["state"] == "up"} == {LIVE, TARPIT}
    assert {h["reason"] for a, h in hosts.items() if h["state"] == "down"} == {"no-response"}
    assert hosts[TARPIT]["tarpit"]
    assert not hosts[LIVE]["tarpit"]
    found = {(p["address"], p["port"]): p for p in result["open_ports"]}
    assert set(found) == SPEC.truth
    # Identified on a normal host, not port by port on the tarpit.
    assert found[(LIVE, 22)]["product"] == "OpenSSH"
    assert all(found[(TARPIT, port)].get("banner") is None for port in range(1, 101))
    assert result["filtered_ports"] == 10
    assert result["total_ports_scanned"] == 200
    assert result["probes_sent"] >= 200
