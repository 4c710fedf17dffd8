"""The `cybersec` client run as a real command against the real API, and the export and diff
routes read back with nmap's own tooling."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys

import httpx
import pytest
from libnmap.parser import NmapParser

from tests.conftest import ROOT, Process, wait_final

pytestmark = pytest.mark.e2e


def run_cli(api: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERSEC_")}
    env.update({"CYBERSEC_API_URL": api, "CYBERSEC_API_KEY": key, "COLUMNS": "200"})
    return subprocess.run(
        [sys.executable, "-m", "cybersec_cli.main", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def test_cli_scan_wait_status_result_and_diff(
    api: str, api_key: str, worker: Process, listeners: list[int]
) -> None:
    spec = f"{listeners[0]}-{listeners[-1]}"
    waited = run_cli(api, api_key, "scan", "127.0.0.1", "-p", spec, "--wait")
    assert waited.returncode == 0, waited.stderr
    for port in listeners:
        assert str(port) in waited.stdout

    submitted = run_cli(api, api_key, "scan", "127.0.0.1", "-p", spec)
    assert submitted.returncode == 0, submitted.stderr
    task_id = submitted.stdout.strip()
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {api_key}"}) as client:
        assert wait_final(client, task_id)["state"] == "SUCCESS"

    status = run_cli(api, api_key, "status", task_id, "--json")
    assert status.returncode == 0, status.stderr
    assert '"SUCCESS"' in status.stdout

    listed = run_cli(api, api_key, "list", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    assert task_id[:8] in listed.stdout

    xml = run_cli(api, api_key, "result", task_id, "--format", "nmap-xml")
    assert xml.returncode == 0, xml.stderr
    report = NmapParser.parse_fromstring(xml.stdout)
    assert [s.port for s in report.hosts[0].services if s.state == "open"] == listeners

    rows = list(
        csv.DictReader(
            io.StringIO(run_cli(api, api_key, "result", task_id, "--format", "csv").stdout)
        )
    )
    assert [int(r["port"]) for r in rows] == listeners

    diff = run_cli(api, api_key, "diff", task_id, "--json")
    assert diff.returncode == 0, diff.stderr
    changes = json.loads(diff.stdout)
    assert changes["newly_open"] == changes["newly_closed"] == []
    assert changes["old"]["task_id"] != changes["new"]["task_id"] == task_id


def test_cli_errors_are_one_line_with_an_exit_code_per_kind(api: str, api_key: str) -> None:
    missing = run_cli(api, api_key, "status", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 4
    assert missing.stderr.strip().count("\n") == 0
    assert missing.stderr.startswith("error: ")
    denied = run_cli(api, "not-a-key", "list")
    assert denied.returncode == 3
    bad = run_cli(api, api_key, "scan", "127.0.0.1", "-p", "80-20")
    assert bad.returncode == 2
    assert "runs backwards" in bad.stderr
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    unreachable = run_cli(f"http://127.0.0.1:{closed_port}", api_key, "list")
    assert unreachable.returncode == 7


def test_exports_and_diff_over_http(
    client: httpx.Client, worker: Process, listeners: list[int]
) -> None:
    target = "127.0.0.3"
    servers = [socket.create_server((target, port)) for port in listeners[:3]]
    try:
        first = client.post(
            "/api/scan", json={"target": target, "ports": ",".join(map(str, listeners))}
        ).json()["task_id"]
        assert wait_final(client, first)["state"] == "SUCCESS"
        # No earlier scan of this target: nothing to compare with.
        assert client.get(f"/api/scan/{first}/diff").status_code == 404
    finally:
        servers[0].close()
    try:
        second = client.post(
            "/api/scan", json={"target": target, "ports": ",".join(map(str, listeners))}
        ).json()["task_id"]
        assert wait_final(client, second)["state"] == "SUCCESS"
        diff = client.get(f"/api/scan/{second}/diff").json()
        assert [p["port"] for p in diff["newly_closed"]] == [listeners[0]]
        assert diff["newly_open"] == []
        explicit = client.get(f"/api/scan/{first}/diff", params={"against": second}).json()
        assert [p["port"] for p in explicit["newly_open"]] == [listeners[0]]

        xml = client.get(f"/api/scan/{second}/result", params={"format": "nmap-xml"})
        assert xml.status_code == 200
        assert xml.headers["content-type"].startswith("application/xml")
        host = NmapParser.parse_fromstring(xml.text).hosts[0]
        assert host.address == target
        assert [s.port for s in host.services if s.state == "open"] == listeners[1:3]
        as_json = client.get(f"/api/scan/{second}/result").json()
        assert [p["port"] for p in as_json["open_ports"]] == listeners[1:3]
        assert client.get(f"/api/scan/{second}/result", params={"format": "pdf"}).status_code == 422
    finally:
        for server in servers[1:]:
            server.close()


def test_result_of_an_unfinished_scan_is_409(
    client: httpx.Client, worker: Process, silent_port: int
) -> None:
    task_id = client.post(
        "/api/scan",
        json={"target": "127.0.0.1", "ports": str(silent_port), "config": {"timeout": 3.0}},
    ).json()["task_id"]
    answer = client.get(f"/api/scan/{task_id}/result")
    assert answer.status_code == 409
    assert answer.json()["error"]["code"] == "not_finished"
    assert client.delete(f"/api/scan/{task_id}").status_code == 202
