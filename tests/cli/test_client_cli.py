"""The client commands, run for real (typer's CliRunner, and once as a process) against the
stand-in API of conftest.py over HTTP on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner, Result

from bench._stack import free_port
from cybersec_cli import client
from cybersec_cli.client import SseEvent, parse_sse, resolve_connection
from shared.diff import ScanDiff
from shared.schemas import ScanResult
from tests.cli.conftest import API_KEY, Server

ROOT = Path(__file__).resolve().parents[2]


def run(api: Server | None, *args: str, key: str | None = API_KEY, **env: str) -> Result:
    """``cybersec <args>`` with the stand-in's URL and key unless the test passes its own."""
    extra = [*(["--api-url", api.url] if api else []), *(["--api-key", key] if key else [])]
    return CliRunner().invoke(client.app, [*args, *extra], env=env or None)


def one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


def table_rows(text: str) -> list[list[str]]:
    """Cells of a rich table's body rows (lines drawn with │)."""
    return [
        [cell.strip() for cell in line.strip().strip("│┃").split("│")]
        for line in text.splitlines()
        if line.strip().startswith("│")
    ]


# --- scan ---------------------------------------------------------------------------------


def test_scan_prints_the_task_id_and_sends_the_options(api: Server) -> None:
    result = run(api, "scan", "127.0.0.1", "-p", "22,80", "--priority", "high", "--timeout", "0.5")
    assert result.exit_code == 0, result.stderr
    task_id = result.stdout.strip()
    assert task_id in api.state.tasks
    assert "queued with high priority" in result.stderr
    assert api.state.bodies == [
        {"target": "127.0.0.1", "ports": "22,80", "priority": "high", "config": {"timeout": 0.5}}
    ]


def test_scan_wait_follows_the_event_stream_and_prints_the_table(api: Server) -> None:
    result = run(api, "scan", "127.0.0.1", "-p", "20-25,80,8000-8100", "--wait")
    assert result.exit_code == 0, result.stderr
    assert "open  127.0.0.1:22" in result.stderr
    assert "open  127.0.0.1:80" in result.stderr
    assert "open  127.0.0.1:8080" in result.stderr
    assert "108/108" in result.stderr  # the bar ends full: ports done / total
    rows = table_rows(result.stdout)
    assert [row[:4] for row in rows] == [
        ["127.0.0.1", "22", "open", "ssh"],
        ["127.0.0.1", "80", "open", "http"],
        ["127.0.0.1", "8080", "open", "http-proxy"],
    ]
    assert rows[0][4:6] == ["OpenSSH", "9.2p1"]
    assert "3 open of 108 ports" in result.stdout
    paths = [path for method, path, _ in api.state.requests if method == "GET"]
    assert len(paths) == 1
    assert paths[0].endswith("/events")  # no polling while the stream works


def test_scan_wait_polls_when_the_api_has_no_event_stream(api: Server) -> None:
    api.state.sse = False
    result = run(api, "scan", "127.0.0.1", "-p", "22,80", "--wait")
    assert result.exit_code == 0, result.stderr
    assert [row[:2] for row in table_rows(result.stdout)] == [
        ["127.0.0.1", "22"],
        ["127.0.0.1", "80"],
    ]
    assert "open  port 22" in result.stderr
    polls = [p for m, p, _ in api.state.requests if m == "GET" and not p.endswith("/events")]
    assert len(polls) == 3


def test_scan_wait_resumes_a_cut_stream_after_the_last_event(api: Server) -> None:
    api.state.cut_stream = True
    result = run(api, "scan", "127.0.0.1", "-p", "22,80,8080,9000", "--wait")
    assert result.exit_code == 0, result.stderr
    assert [row[1] for row in table_rows(result.stdout)] == ["22", "80", "8080"]
    assert "4/4 ports" in result.stderr
    assert result.stderr.count("open  127.0.0.1:22") == 1
    assert "open  127.0.0.1:8080" in result.stderr
    gets = [p for m, p, _ in api.state.requests if m == "GET"]
    assert len(gets) == 2
    assert all(p.endswith("/events") for p in gets)
    assert api.state.last_event_ids == [None, "4"]  # 3 port events and the critical tier


@pytest.mark.parametrize("sse", [True, False])
def test_scan_wait_exits_8_when_the_scan_fails(api: Server, sse: bool) -> None:
    api.state.sse, api.state.outcome = sse, "FAILURE"
    result = run(api, "scan", "127.0.0.1", "-p", "22", "--wait")
    assert result.exit_code == client.EXIT_SCAN_FAILED
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert errors == ["error: scan failed: OSError: too many open files (scan_failed)"]
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # after the progress bar
    assert result.stdout == ""


def test_scan_rejected_by_validation_exits_2(api: Server) -> None:
    result = run(api, "scan", "127.0.0.1", "-p", "80-20")
    assert result.exit_code == client.EXIT_USAGE
    assert one_error_line(result).endswith("(validation_error)")
    assert "runs backwards" in result.stderr


# --- failures: one line and an exit code per kind ---------------------------------------------


def test_unknown_task_exits_4(api: Server) -> None:
    result = run(api, "status", "0b1eb912-0000-4000-8000-000000000000")
    assert result.exit_code == client.EXIT_NOT_FOUND == 4
    assert one_error_line(result) == (
        "error: no scan with task id 0b1eb912-0000-4000-8000-000000000000 (not_found)"
    )
    assert result.stdout == ""


def test_a_wrong_key_exits_3(api: Server) -> None:
    result = run(api, "list", key="wrong")
    assert result.exit_code == client.EXIT_AUTH == 3
    assert one_error_line(result) == "error: missing or invalid API key (unauthorized)"
    missing = run(api, "list", key=None)
    assert missing.exit_code == 3


def test_a_refused_connection_exits_7() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(client.app, ["status", "x", "--api-url", url])
    assert result.exit_code == client.EXIT_CONNECTION == 7
    line = one_error_line(result)
    assert line.startswith(f"error: cannot reach the API at {url}: ")
    assert line.endswith("(connection_failed)")


def test_rate_limited_exits_5_and_unavailable_exits_6(api: Server) -> None:
    api.state.fail_with = 429
    result = run(api, "list")
    assert result.exit_code == client.EXIT_RATE_LIMITED == 5
    assert one_error_line(result) == "error: too many requests; retry after 7 s (rate_limited)"
    api.state.fail_with = 503
    result = run(api, "cancel", str(api.state.done.task_id))
    assert result.exit_code == client.EXIT_SERVER == 6
    assert one_error_line(result) == "error: database unavailable (unavailable)"


def test_a_path_like_task_id_stays_one_path_segment(api: Server) -> None:
    result = run(api, "status", "../scans")
    assert result.exit_code == 4
    assert api.state.requests[-1][1] == "/api/scan/../scans"


# --- status, list, cancel -------------------------------------------------------------------


def test_status_of_a_finished_scan(api: Server) -> None:
    result = run(api, "status", str(api.state.done.task_id))
    assert result.exit_code == 0, result.stderr
    assert "SUCCESS" in result.stdout
    assert "Scan completed" in result.stdout
    assert [row[1] for row in table_rows(result.stdout)] == ["22", "80", "8080"]
    raw = run(api, "status", str(api.state.done.task_id), "--json")
    assert ScanResult.model_validate(_json(raw.stdout)["result"]) == api.state.done.result


def test_list_pages_and_filters(api: Server) -> None:
    done, previous = api.state.done, api.state.previous
    result = run(api, "list")
    assert result.exit_code == 0, result.stderr
    assert [row[0] for row in table_rows(result.stdout)] == [
        str(done.task_id),
        str(previous.task_id),
    ]
    first = run(api, "list", "--limit", "1")
    assert [row[0] for row in table_rows(first.stdout)] == [str(done.task_id)]
    assert "more: cybersec list --cursor 1" in first.stderr
    everything = run(api, "list", "--limit", "1", "--all", "--json")
    items = _json(everything.stdout)["items"]
    assert [i["task_id"] for i in items] == [str(done.task_id), str(previous.task_id)]
    run(api, "list", "--state", "completed", "--target", "127.0.0.1")
    assert api.state.requests[-1][2] == {"limit": "20", "state": "completed", "target": "127.0.0.1"}
    assert run(api, "list", "--state", "done").exit_code == 2  # typer's usage error


def test_cancel_a_queued_scan(api: Server) -> None:
    task_id = run(api, "scan", "127.0.0.1", "-p", "22").stdout.strip()
    result = run(api, "cancel", task_id)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"{task_id}: REVOKED"
    assert api.state.tasks[task_id].state == "REVOKED"


# --- result exports ---------------------------------------------------------------------------


def test_result_as_csv(api: Server) -> None:
    result = run(api, "result", str(api.state.done.task_id), "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows == [
        ["address", "port", "state", "service", "product", "version", "reason", "banner"],
        [
            "127.0.0.1",
            "22",
            "open",
            "ssh",
            "OpenSSH",
            "9.2p1",
            "syn-ack",
            "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3",
        ],
        ["127.0.0.1", "80", "open", "http", "nginx", "1.25.3", "syn-ack", ""],
        ["127.0.0.1", "8080", "open", "http-proxy", "", "", "syn-ack", ""],
    ]
    assert api.state.requests[-1][2] == {"format": "csv"}


def test_result_as_json_and_as_a_table(api: Server) -> None:
    task_id = str(api.state.done.task_id)
    as_json = run(api, "result", task_id, "-f", "json")
    assert ScanResult.model_validate_json(as_json.stdout) == api.state.done.result
    table = run(api, "result", task_id)
    assert table.exit_code == 0, table.stderr
    assert [row[1] for row in table_rows(table.stdout)] == ["22", "80", "8080"]
    assert "3 open of 8 ports" in table.stdout


def test_result_as_nmap_xml_to_a_file(api: Server, tmp_path: Path) -> None:
    out = tmp_path / "scan.xml"
    result = run(api, "result", str(api.state.done.task_id), "-f", "nmap-xml", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    root = ET.fromstring(out.read_bytes())  # noqa: S314  # the stand-in's export of our data
    assert root.tag == "nmaprun"
    assert [p.get("portid") for p in root.iter("port")] == ["22", "80", "8080"]


def test_result_of_an_unfinished_scan_exits_2(api: Server) -> None:
    task_id = run(api, "scan", "127.0.0.1", "-p", "22").stdout.strip()
    result = run(api, "result", task_id, "-f", "csv")
    assert result.exit_code == 2
    assert one_error_line(result) == "error: scan is PENDING (not_finished)"


# --- diff ---------------------------------------------------------------------------------


def test_diff_against_the_previous_scan(api: Server) -> None:
    done, previous = api.state.done, api.state.previous
    result = run(api, "diff", str(done.task_id))
    assert result.exit_code == 0, result.stderr
    rows = table_rows(result.stdout)
    assert ["+ opened", "127.0.0.1", "8080", "http-proxy", ""] in rows
    assert ["- closed", "127.0.0.1", "443", "", ""] not in rows  # 443 was closed in both
    assert [
        "~ changed",
        "127.0.0.1",
        "80",
        "http nginx 1.25.3",
        "version: 1.24.0 -> 1.25.3",
    ] in rows
    assert "1 opened, 0 closed, 1 changed, 1 unchanged" in result.stdout
    assert f"old: scan {previous.scan_id}, task {previous.task_id}, 127.0.0.1 20-25,80,443, " in (
        result.stdout
    )
    assert api.state.requests[-1][2] == {"against": "previous"}
    raw = run(api, "diff", str(done.task_id), "--against", str(previous.task_id), "--json")
    diff = ScanDiff.model_validate_json(raw.stdout)
    assert (diff.old.task_id, diff.new.task_id) == (previous.task_id, done.task_id)


def test_diff_shows_closed_ports(api: Server) -> None:
    newer = api.state.add(
        "127.0.0.1", "20-25,80,8080", api.state.done.created_at.replace(year=2027)
    )
    assert newer.result is not None
    newer.result = newer.result.model_copy(update={"open_ports": newer.result.open_ports[:1]})
    result = run(api, "diff", str(newer.task_id))
    rows = table_rows(result.stdout)
    assert [row[:3] for row in rows] == [
        ["- closed", "127.0.0.1", "80"],
        ["- closed", "127.0.0.1", "8080"],
    ]


# --- where the API is -------------------------------------------------------------------------


def test_flags_win_over_env_over_the_config_file(api: Server, tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'api_url = "{api.url}"\napi_key = "{API_KEY}"\n')
    env = {"CYBERSEC_CONFIG": str(config)}
    assert run(None, "list", key=None, **env).exit_code == 0
    assert run(None, "list", key=None, CYBERSEC_API_KEY="wrong", **env).exit_code == 3
    assert run(None, "list", key=API_KEY, CYBERSEC_API_KEY="wrong", **env).exit_code == 0
    refused = f"http://127.0.0.1:{free_port()}"
    assert run(None, "list", key=None, CYBERSEC_API_URL=refused, **env).exit_code == 7


def test_resolve_connection_order_and_defaults(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('api_url = "http://127.0.0.2:9000/"\napi_key = "file"\n')
    env = {"CYBERSEC_CONFIG": str(config), "CYBERSEC_API_KEY": "env"}
    assert resolve_connection(None, None, env) == client.Connection("http://127.0.0.2:9000", "env")
    assert resolve_connection("http://127.0.0.3", "flag", env).api_key == "flag"
    empty = {"CYBERSEC_CONFIG": str(tmp_path / "none.toml")}
    assert resolve_connection(None, None, empty) == client.Connection(client.DEFAULT_API_URL, None)
    xdg = tmp_path / "xdg" / "cybersec"
    xdg.mkdir(parents=True)
    (xdg / "config.toml").write_text('api_key = "xdg"\n')
    assert (
        resolve_connection(None, None, {"XDG_CONFIG_HOME": str(tmp_path / "xdg")}).api_key == "xdg"
    )


@pytest.mark.parametrize(
    "text",
    ['api_url = "http://127.0.0.1"\ntoken = "x"\n', "api_url = [", "api_key = 5\n"],
)
def test_a_bad_config_file_exits_2(tmp_path: Path, text: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(text)
    result = CliRunner().invoke(client.app, ["list"], env={"CYBERSEC_CONFIG": str(config)})
    assert result.exit_code == 2
    assert one_error_line(result).endswith("(bad_config)")


def test_a_url_that_is_not_http_exits_2() -> None:
    result = CliRunner().invoke(client.app, ["list", "--api-url", "127.0.0.1:8000"])
    assert result.exit_code == 2
    assert one_error_line(result).endswith("(bad_config)")


# --- pieces -----------------------------------------------------------------------------------


def test_parse_sse() -> None:
    lines = [
        ": comment",
        "id: 1",
        "event: progress",
        'data: {"a":',
        "data:1}",
        "",
        "",
        "data: plain",
        "retry: 100",
        "",
        "event: ignored-without-data",
        "",
    ]
    assert list(parse_sse(lines)) == [
        SseEvent("progress", '{"a":\n1}', "1"),
        SseEvent("message", "plain", "1"),
    ]


def test_the_commands_mount_into_another_typer_app(api: Server) -> None:
    root = typer.Typer()

    @root.command()
    def migrate() -> None:
        """Stands in for cybersec's own commands."""

    root.add_typer(client.app)
    result = CliRunner().invoke(
        root,
        [
            "result",
            str(api.state.done.task_id),
            "-f",
            "csv",
            "--api-url",
            api.url,
            "--api-key",
            API_KEY,
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("address,port,state")


@pytest.mark.timeout(60)
def test_scan_wait_as_a_process(api: Server) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYBERSEC_API")}
    command = [sys.executable, "-m", "cybersec_cli.client", "scan", "127.0.0.1", "-p", "1-100"]
    done = subprocess.run(
        [*command, "--wait", "--api-url", api.url, "--api-key", API_KEY],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [row[:2] for row in table_rows(done.stdout)] == [
        ["127.0.0.1", "22"],
        ["127.0.0.1", "80"],
    ]
    assert "open  127.0.0.1:80" in done.stderr
    refused = subprocess.run(
        [*command, "--api-url", f"http://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=50,
        check=False,
    )
    assert refused.returncode == 7
    assert len(refused.stderr.strip().splitlines()) == 1


def _json(text: str) -> Any:
    import json

    return json.loads(text)
