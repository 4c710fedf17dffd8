"""Exports, read back by the tools that consume them: csv, ndiff, python-libnmap, xmllint + nmap's
DTD, and nmap itself scanning sockets this test opened on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import socket
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from libnmap.parser import NmapParser

from shared.exports import CSV_COLUMNS, EXPORT_FORMATS, MEDIA_TYPES, render, to_csv, to_nmap_xml
from shared.ports import parse_port_spec
from shared.schemas import PortResult, ScanResult
from tests import needs

NMAP_DTD = Path("/usr/share/nmap/nmap.dtd")
STARTED = datetime(2026, 11, 25, 14, 22, 25, tzinfo=UTC)


def open_port(port: int, address: str = "127.0.0.1", **fields: Any) -> PortResult:
    return PortResult(port=port, state="open", address=address, reason="syn-ack", **fields)


def make_result(
    open_ports: list[PortResult],
    *,
    target: str = "127.0.0.1",
    addresses: list[str] | None = None,
    ports: str = "20-25,80,443,8080",
    closed: int | None = None,
    filtered: int = 0,
    started: datetime = STARTED,
) -> ScanResult:
    addresses = addresses or ["127.0.0.1"]
    total = len(parse_port_spec(ports)) * len(addresses)
    return ScanResult(
        scan_id=uuid4(),
        target=target,
        addresses=addresses,
        ports=ports,
        total_ports_scanned=total,
        open_ports=open_ports,
        closed_ports=total - len(open_ports) - filtered if closed is None else closed,
        filtered_ports=filtered,
        started_at=started,
        finished_at=started + timedelta(seconds=2.5),
        duration_seconds=2.5,
    )


BEFORE = make_result(
    [
        open_port(
            22, service="ssh", product="OpenSSH", version="9.2p1", banner="SSH-2.0-OpenSSH_9.2p1"
        ),
        open_port(80, service="http", product="nginx", version="1.24.0"),
        open_port(443, service="https"),
    ]
)
AFTER = make_result(
    [
        open_port(
            22, service="ssh", product="OpenSSH", version="9.2p1", banner="SSH-2.0-OpenSSH_9.2p1"
        ),
        open_port(80, service="http", product="nginx", version="1.25.3"),
        open_port(8080, service="http-proxy"),
    ],
    started=STARTED + timedelta(days=1),
)


def xml_root(xml: bytes | str) -> ET.Element:
    return ET.fromstring(xml)  # noqa: S314  # our own output or ndiff's, not untrusted input


def attrib(element: ET.Element, path: str) -> dict[str, str]:
    found = element.find(path)
    assert found is not None, path
    return dict(found.attrib)


def write(tmp_path: Path, name: str, result: ScanResult) -> Path:
    path = tmp_path / name
    path.write_bytes(to_nmap_xml(result))
    return path


# --- json and csv ----------------------------------------------------------------------------


def test_every_format_renders_with_a_media_type() -> None:
    for fmt in EXPORT_FORMATS:
        assert render(BEFORE, fmt)
        assert MEDIA_TYPES[fmt]


def test_json_reads_back_as_the_same_result() -> None:
    assert ScanResult.model_validate_json(render(BEFORE, "json")) == BEFORE


def test_csv_has_the_header_and_one_row_per_open_port() -> None:
    rows = list(csv.DictReader(io.StringIO(to_csv(BEFORE).decode())))
    assert tuple(rows[0].keys()) == CSV_COLUMNS
    assert [(r["address"], r["port"], r["state"], r["service"]) for r in rows] == [
        ("127.0.0.1", "22", "open", "ssh"),
        ("127.0.0.1", "80", "open", "http"),
        ("127.0.0.1", "443", "open", "https"),
    ]
    assert rows[0]["product"] == "OpenSSH"
    assert rows[0]["version"] == "9.2p1"
    assert rows[0]["reason"] == "syn-ack"
    assert rows[0]["banner"] == "SSH-2.0-OpenSSH_9.2p1"
    assert rows[2]["product"] == rows[2]["banner"] == ""


def test_csv_keeps_hostile_banners_text_and_quotes_them() -> None:
    banner = '=HYPERLINK("http://x","y"),\r\n"quoted"'
    result = make_result([open_port(25, service="smtp", banner=banner, product="@evil")])
    (row,) = csv.DictReader(io.StringIO(to_csv(result).decode(), newline=""))
    assert row["banner"] == "'" + banner
    assert row["product"] == "'@evil"


def test_csv_orders_by_address_then_port() -> None:
    result = make_result(
        [open_port(80, "::1"), open_port(443, "127.0.0.2"), open_port(22, "127.0.0.2")],
        addresses=["127.0.0.2", "::1"],
    )
    rows = list(csv.reader(io.StringIO(to_csv(result).decode())))[1:]
    assert [(r[0], r[1]) for r in rows] == [
        ("127.0.0.2", "22"),
        ("127.0.0.2", "443"),
        ("::1", "80"),
    ]


# --- nmap xml: structure -----------------------------------------------------------------------


def test_xml_has_nmaps_structure() -> None:
    root = xml_root(to_nmap_xml(BEFORE, scanner_version="1.2.3"))
    assert root.tag == "nmaprun"
    assert root.attrib["scanner"] == "cybersec-scan"
    assert root.attrib["version"] == "1.2.3"
    assert root.attrib["xmloutputversion"] == "1.05"
    assert root.attrib["start"] == str(int(STARTED.timestamp()))
    assert root.attrib["startstr"] == "Wed Nov 25 14:22:25 2026"
    scaninfo = root.find("scaninfo")
    assert scaninfo is not None
    assert scaninfo.attrib == {
        "type": "connect",
        "protocol": "tcp",
        "numservices": "9",
        "services": "20-25,80,443,8080",
    }
    (host,) = root.findall("host")
    assert host.find("status") is not None
    extra = host.find("ports/extraports")
    assert extra is not None
    assert extra.attrib == {"state": "closed", "count": "6"}
    ssh = host.find("ports/port[@portid='22']")
    assert ssh is not None
    state, service = ssh.find("state"), ssh.find("service")
    assert state is not None
    assert service is not None
    assert state.attrib == {"state": "open", "reason": "syn-ack", "reason_ttl": "0"}
    assert service.attrib == {
        "name": "ssh",
        "product": "OpenSSH",
        "version": "9.2p1",
        "method": "probed",
        "conf": "10",
    }
    https = host.find("ports/port[@portid='443']/service")
    assert https is not None
    assert https.attrib == {"name": "https", "method": "table", "conf": "3"}
    finished = root.find("runstats/finished")
    hosts = root.find("runstats/hosts")
    assert finished is not None
    assert hosts is not None
    assert finished.attrib["elapsed"] == "2.50"
    assert finished.attrib["exit"] == "success"
    assert hosts.attrib == {"up": "1", "down": "0", "total": "1"}


def test_xml_escapes_and_strips_what_xml_cannot_carry() -> None:
    banner = 'hi <b>&"\x00\x1b[31m\x7f'
    result = make_result([open_port(21, service="ftp", product="<x>&", banner=banner)])
    root = xml_root(to_nmap_xml(result))
    script = root.find("host/ports/port/script")
    service = root.find("host/ports/port/service")
    assert script is not None
    assert service is not None
    assert script.attrib == {"id": "banner", "output": 'hi <b>&"\\x00\\x1b[31m\x7f'}
    assert service.attrib["product"] == "<x>&"


def test_xml_one_host_per_address_with_the_hostname() -> None:
    result = make_result(
        [open_port(22, "127.0.0.1", service="ssh"), open_port(80, "::1", service="http")],
        target="localhost",
        addresses=["127.0.0.1", "::1"],
        ports="22,80",
    )
    root = xml_root(to_nmap_xml(result))
    hosts = root.findall("host")
    assert [attrib(h, "address") for h in hosts] == [
        {"addr": "127.0.0.1", "addrtype": "ipv4"},
        {"addr": "::1", "addrtype": "ipv6"},
    ]
    for host in hosts:
        name = host.find("hostnames/hostname")
        assert name is not None
        assert name.attrib == {"name": "localhost", "type": "user"}
        extra = host.find("ports/extraports")
        assert extra is not None
        assert extra.attrib == {"state": "closed", "count": "1"}


def test_xml_states_a_split_it_cannot_know_as_closed_or_filtered() -> None:
    one = make_result([open_port(22)], ports="20-25", closed=3, filtered=2)
    extras = xml_root(to_nmap_xml(one)).findall("host/ports/extraports")
    assert [(e.attrib["state"], e.attrib["count"]) for e in extras] == [
        ("closed", "3"),
        ("filtered", "2"),
    ]
    two = make_result(
        [open_port(22)], addresses=["127.0.0.1", "127.0.0.2"], ports="20-25", closed=8, filtered=3
    )
    extras = xml_root(to_nmap_xml(two)).findall("host/ports/extraports")
    assert [(e.attrib["state"], e.attrib["count"]) for e in extras] == [
        ("closed|filtered", "5"),
        ("closed|filtered", "6"),
    ]


def test_xml_without_open_ports_or_addresses() -> None:
    result = make_result([], addresses=["127.0.0.1"], ports="1-3")
    root = xml_root(to_nmap_xml(result))
    assert root.findall("host/ports/port") == []
    legacy = result.model_copy(update={"addresses": []})
    address = xml_root(to_nmap_xml(legacy)).find("host/address")
    assert address is not None
    assert address.attrib["addr"] == "127.0.0.1"


def test_xml_is_valid_under_nmaps_dtd(tmp_path: Path) -> None:
    xmllint = needs.tool("xmllint")
    needs.file(NMAP_DTD, "nmap-common")
    # The DTD enumerates scanner="nmap" only; that attribute is the one place we say who we are.
    dtd = tmp_path / "nmap.dtd"
    dtd.write_text(
        NMAP_DTD.read_text().replace("scanner\t\t(nmap)", "scanner\t\t(nmap|cybersec-scan)")
    )
    assert "(nmap|cybersec-scan)" in dtd.read_text()
    multi = make_result(
        [open_port(22, "127.0.0.1", banner="x\x01"), open_port(80, "::1")],
        target="localhost",
        addresses=["127.0.0.1", "::1"],
        closed=10,
        filtered=4,
    )
    for name, result in (("before.xml", BEFORE), ("after.xml", AFTER), ("multi.xml", multi)):
        path = write(tmp_path, name, result)
        run = subprocess.run(
            [xmllint, "--noout", "--dtdvalid", str(dtd), str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stderr


# --- nmap xml: read by ndiff and python-libnmap ------------------------------------------------


def test_ndiff_finds_no_difference_between_a_scan_and_itself(tmp_path: Path) -> None:
    ndiff = needs.tool("ndiff")
    path = write(tmp_path, "scan.xml", BEFORE)
    run = subprocess.run([ndiff, str(path), str(path)], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stderr == ""


def test_ndiff_reports_what_changed(tmp_path: Path) -> None:
    ndiff = needs.tool("ndiff")
    old, new = write(tmp_path, "old.xml", BEFORE), write(tmp_path, "new.xml", AFTER)
    run = subprocess.run([ndiff, str(old), str(new)], capture_output=True, text=True, check=False)
    assert run.returncode == 1, run.stderr  # 1: the scans differ
    assert run.stderr == ""
    lines = {" ".join(line.split()) for line in run.stdout.splitlines()}
    assert "-80/tcp open http nginx 1.24.0" in lines
    assert "+80/tcp open http nginx 1.25.3" in lines
    assert "-443/tcp open https" in lines
    assert "+8080/tcp open http-proxy" in lines
    assert not any("22/tcp" in line for line in lines)

    run = subprocess.run(
        [ndiff, "--xml", str(old), str(new)], capture_output=True, text=True, check=False
    )
    assert ndiff_ports(run.stdout) == {
        "80": (("open", "1.24.0"), ("open", "1.25.3")),
        "443": (("open", None), (None, None)),
        "8080": ((None, None), ("open", None)),
    }


Side = tuple[str | None, str | None]


def ndiff_ports(xml: str) -> dict[str, tuple[Side, Side]]:
    """Per port id in ``ndiff --xml`` output: (state, service version) before and after."""
    diffs: dict[str, tuple[Side, Side]] = {}
    for portdiff in xml_root(xml).iter("portdiff"):
        any_port = portdiff.find(".//port")
        assert any_port is not None

        def side(name: str, portdiff: ET.Element = portdiff) -> Side:
            port = portdiff.find(f"{name}/port")
            if port is None:  # both sides share the port and state; only the service differs
                state, service = portdiff.find("port/state"), portdiff.find(f"port/{name}/service")
            else:
                state, service = port.find("state"), port.find("service")
            return (
                None if state is None else state.get("state"),
                None if service is None else service.get("version"),
            )

        diffs[any_port.attrib["portid"]] = (side("a"), side("b"))
    return diffs


def libnmap_view(xml: bytes | str) -> dict[str, Any]:
    """What python-libnmap reads: per address, its hostnames and open ports with services."""
    text = xml.decode() if isinstance(xml, bytes) else xml
    report = NmapParser.parse_fromstring(text)
    view: dict[str, Any] = {}
    for host in report.hosts:
        view[host.address] = {
            "up": host.is_up(),
            "hostnames": list(host.hostnames),
            "open": {
                service.port: (
                    service.state,
                    service.service or None,
                    service.service_dict.get("product"),
                    service.service_dict.get("version"),
                )
                for service in host.services
                if service.state == "open"
            },
        }
    return view


def test_libnmap_reads_back_hosts_ports_states_and_services() -> None:
    report = NmapParser.parse_fromstring(to_nmap_xml(BEFORE).decode())
    assert report.commandline == "cybersec scan 127.0.0.1 -p 20-25,80,443,8080"
    assert report.scan_type == "connect"
    assert report.hosts_total == 1
    assert report.hosts_up == 1
    assert report.elapsed == 2.5
    assert report.started == int(STARTED.timestamp())
    assert libnmap_view(to_nmap_xml(BEFORE)) == {
        "127.0.0.1": {
            "up": True,
            "hostnames": [],
            "open": {
                22: ("open", "ssh", "OpenSSH", "9.2p1"),
                80: ("open", "http", "nginx", "1.24.0"),
                443: ("open", "https", None, None),
            },
        }
    }
    (host,) = report.hosts
    assert host.extraports_state["state"] == {"state": "closed", "count": "6"}
    assert host.extraports_reasons == [{"reason": "conn-refused", "count": "6"}]
    ssh = host.get_service(22)
    assert ssh.reason == "syn-ack"
    assert ssh.scripts_results[0]["output"] == "SSH-2.0-OpenSSH_9.2p1"


def test_libnmap_reads_back_several_addresses_and_the_hostname() -> None:
    result = make_result(
        [open_port(22, "127.0.0.1", service="ssh"), open_port(80, "::1", service="http")],
        target="localhost",
        addresses=["127.0.0.1", "::1"],
        ports="22,80",
    )
    assert libnmap_view(to_nmap_xml(result)) == {
        "127.0.0.1": {
            "up": True,
            "hostnames": ["localhost"],
            "open": {22: ("open", "ssh", None, None)},
        },
        "::1": {"up": True, "hostnames": ["localhost"], "open": {80: ("open", "http", None, None)}},
    }


def test_libnmap_diff_of_two_exports_names_the_changed_ports() -> None:
    old = NmapParser.parse_fromstring(to_nmap_xml(BEFORE).decode()).hosts[0]
    new = NmapParser.parse_fromstring(to_nmap_xml(AFTER).decode()).hosts[0]
    changes = new.diff(old)
    assert changes.added() == {"NmapService::tcp.8080"}
    assert changes.removed() == {"NmapService::tcp.443"}
    assert changes.changed() == {"NmapService::tcp.80"}
    assert "NmapService::tcp.22" in changes.unchanged()


# --- against nmap itself --------------------------------------------------------------------


@pytest.fixture
def listeners() -> Iterator[tuple[list[int], int]]:
    """Three listening sockets on 127.0.0.1 and a port that was just free (closed)."""
    sockets = []
    try:
        for _ in range(3):
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", 0))
            sock.listen(16)
        with socket.socket() as spare:
            spare.bind(("127.0.0.1", 0))
            closed: int = spare.getsockname()[1]
        yield sorted(s.getsockname()[1] for s in sockets), closed
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.timeout(60)
def test_libnmap_reads_the_same_open_ports_from_nmap_and_from_us(
    listeners: tuple[list[int], int],
) -> None:
    nmap = needs.tool("nmap")
    open_ports, closed = listeners
    spec = ",".join(map(str, sorted([*open_ports, closed])))
    run = subprocess.run(
        [nmap, "-sT", "-Pn", "-n", "--max-retries", "1", "-p", spec, "127.0.0.1", "-oX", "-"],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    ours = make_result([open_port(p) for p in open_ports], ports=spec, closed=1)

    def open_set(xml: bytes | str) -> dict[str, set[int]]:
        return {a: set(v["open"]) for a, v in libnmap_view(xml).items()}

    assert open_set(run.stdout) == {"127.0.0.1": set(open_ports)}
    assert open_set(to_nmap_xml(ours)) == open_set(run.stdout)
    theirs = NmapParser.parse_fromstring(run.stdout).hosts[0].get_service(closed)
    assert theirs.state == "closed"


@pytest.mark.parametrize(
    "banner",
    ['x;=HYPERLINK("http://x","y")', "x\t+cmd|' /C calc'!A0", "a, @SUM(1)", "ok|-2+3"],
)
def test_csv_neutralises_a_formula_after_any_separator(banner: str) -> None:
    """A spreadsheet splitting on ';' or tabs saw 'x;=HYPERLINK(..)' as a formula cell."""
    result = make_result([open_port(25, service="smtp", banner=banner)])
    text = to_csv(result).decode()
    (row,) = csv.DictReader(io.StringIO(text, newline=""))
    for separator in ";\t,|":
        for cell in row["banner"].split(separator):
            assert not cell.lstrip(" ").startswith(("=", "+", "-", "@")), row["banner"]
    # Every cell is quoted, so no separator inside one splits it for a reader that honours quotes.
    assert all(line.startswith('"') for line in text.splitlines()[1:])
