"""A finished scan rendered for other tools: JSON, CSV, and nmap's own XML output format.

The XML follows nmap's ``nmaprun`` DTD (xmloutputversion 1.05) closely enough that ``ndiff``,
python-libnmap and nmap's XSL stylesheet read it as if nmap had written it. Text that came off
the network (banners, products, versions) is made XML-safe and, in CSV, spreadsheet-safe.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Final, Literal, get_args

import orjson

from shared.ports import PortSpecError, parse_port_spec
from shared.schemas import PortResult, ScanResult
from shared.targets import TargetError, parse_target

ExportFormat = Literal["json", "csv", "nmap-xml"]
EXPORT_FORMATS: Final[tuple[ExportFormat, ...]] = get_args(ExportFormat)
MEDIA_TYPES: Final[dict[ExportFormat, str]] = {
    "json": "application/json",
    "csv": "text/csv; charset=utf-8",
    "nmap-xml": "application/xml",
}
FILE_EXTENSIONS: Final[dict[ExportFormat, str]] = {"json": "json", "csv": "csv", "nmap-xml": "xml"}

CSV_COLUMNS: Final = (
    "address",
    "port",
    "state",
    "service",
    "product",
    "version",
    "reason",
    "banner",
)
SCANNER: Final = "cybersec-scan"
XML_OUTPUT_VERSION: Final = "1.05"

# Characters XML 1.0 cannot carry at all, escaped or not; banners may contain any byte.
_XML_INVALID: Final = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# Cells a spreadsheet would evaluate as a formula (OWASP "CSV injection").
_FORMULA_START: Final = ("=", "+", "-", "@", "\t", "\r")
# A formula after a separator: a spreadsheet that splits on ";" or tabs (many locales) sees
# "x;=HYPERLINK(..)" as two cells, the second a formula. Neutralised wherever it starts.
_FORMULA_AFTER_SEPARATOR: Final = re.compile(r"([,;\t|\r\n][ ]*)([=+\-@])")


def render(result: ScanResult, fmt: ExportFormat) -> bytes:
    """The result in one of :data:`EXPORT_FORMATS`; pair it with ``MEDIA_TYPES[fmt]``."""
    if fmt == "json":
        return to_json(result)
    if fmt == "csv":
        return to_csv(result)
    return to_nmap_xml(result)


def to_json(result: ScanResult) -> bytes:
    """The result as ``ScanResult`` JSON: ``ScanResult.model_validate_json`` reads it back."""
    return orjson.dumps(result.model_dump(mode="json"), option=orjson.OPT_INDENT_2) + b"\n"


def to_csv(result: ScanResult) -> bytes:
    """One row per open port under the header ``address,port,state,...,banner``.

    Every cell is quoted, and a formula is neutralised with a ``'`` wherever a spreadsheet could
    start one: at the start of a cell and after any separator inside it, so a hostile banner
    stays text whichever separator the spreadsheet's locale splits on.
    """
    buffer = io.StringIO()
    buffer.write(",".join(CSV_COLUMNS) + "\r\n")  # our own names: nothing to quote
    writer = csv.writer(buffer, lineterminator="\r\n", quoting=csv.QUOTE_ALL)
    for address, port in _open_ports(result):
        writer.writerow(
            [
                address,
                port.port,
                port.state,
                *(
                    _csv_text(value)
                    for value in (
                        port.service,
                        port.product,
                        port.version,
                        port.reason,
                        port.banner,
                    )
                ),
            ]
        )
    return buffer.getvalue().encode()


def to_nmap_xml(result: ScanResult, *, scanner_version: str | None = None) -> bytes:
    """The result as an nmap XML report: one ``<host>`` per scanned address."""
    version = scanner_version or _own_version()
    start, end = _epoch(result.started_at), _epoch(result.finished_at)
    args = _xml_text(f"cybersec scan {result.target} -p {result.ports}")
    port_count = _port_count(result)
    root = ET.Element(
        "nmaprun",
        scanner=SCANNER,
        args=args,
        start=str(start),
        startstr=_timestr(result.started_at),
        version=version,
        xmloutputversion=XML_OUTPUT_VERSION,
    )
    ET.SubElement(
        root,
        "scaninfo",
        type="connect",
        protocol="tcp",
        numservices=str(port_count),
        services=result.ports,
    )
    ET.SubElement(root, "verbose", level="0")
    ET.SubElement(root, "debugging", level="0")

    addresses = _addresses(result)
    by_address: dict[str, list[PortResult]] = {address: [] for address in addresses}
    for address, port in _open_ports(result):
        by_address.setdefault(address, []).append(port)
    hostname = _hostname(result.target)
    for address, ports in by_address.items():
        host = ET.SubElement(root, "host", starttime=str(start), endtime=str(end))
        # Hosts are never pinged (like nmap -Pn), so "up" is the user's word: reason user-set.
        ET.SubElement(host, "status", state="up", reason="user-set", reason_ttl="0")
        ET.SubElement(host, "address", addr=address, addrtype=_addrtype(address))
        hostnames = ET.SubElement(host, "hostnames")
        if hostname is not None:
            ET.SubElement(hostnames, "hostname", name=_xml_text(hostname), type="user")
        _ports_element(host, result, ports, port_count - len(ports), single=len(by_address) == 1)

    elapsed = f"{result.duration_seconds:.2f}"
    hosts = len(by_address)
    runstats = ET.SubElement(root, "runstats")
    ET.SubElement(
        runstats,
        "finished",
        time=str(end),
        timestr=_timestr(result.finished_at),
        summary=(
            f"{SCANNER} done at {_timestr(result.finished_at)}; {hosts} IP address"
            f"{'' if hosts == 1 else 'es'} ({hosts} host{'' if hosts == 1 else 's'} up) "
            f"scanned in {elapsed} seconds"
        ),
        elapsed=elapsed,
        exit="success",
    )
    ET.SubElement(runstats, "hosts", up=str(hosts), down="0", total=str(hosts))

    ET.indent(root, space="")
    body = ET.tostring(root, encoding="unicode")
    header = '<?xml version="1.0" encoding="UTF-8"?>\n<!DOCTYPE nmaprun>\n'
    return (header + body + "\n").encode()


def _ports_element(
    host: ET.Element, result: ScanResult, ports: list[PortResult], others: int, *, single: bool
) -> None:
    element = ET.SubElement(host, "ports")
    for state, reason, count in _extraports(result, others, single=single):
        if count <= 0:
            continue
        extra = ET.SubElement(element, "extraports", state=state, count=str(count))
        if reason is not None:
            ET.SubElement(extra, "extrareasons", reason=reason, count=str(count))
    for port in sorted(ports, key=lambda p: p.port):
        item = ET.SubElement(element, "port", protocol="tcp", portid=str(port.port))
        ET.SubElement(
            item, "state", state=port.state, reason=port.reason or "syn-ack", reason_ttl="0"
        )
        probed = any(v is not None for v in (port.product, port.version, port.banner))
        if port.service is not None or probed:
            attrs = {"name": _xml_text(port.service or "unknown")}
            if port.product is not None:
                attrs["product"] = _xml_text(port.product)
            if port.version is not None:
                attrs["version"] = _xml_text(port.version)
            attrs |= (
                {"method": "probed", "conf": "10"} if probed else {"method": "table", "conf": "3"}
            )
            ET.SubElement(item, "service", attrs)
        if port.banner is not None:
            # How nmap's own "banner" NSE script reports a greeting.
            ET.SubElement(item, "script", id="banner", output=_xml_text(port.banner))


def _extraports(
    result: ScanResult, others: int, *, single: bool
) -> list[tuple[str, str | None, int]]:
    """(state, reason, count) of an address's ports that are not open.

    The result counts closed and filtered ports over all addresses; the split per address is
    known only with one address or when one of the two counts is zero. Otherwise nmap's own
    ``closed|filtered`` state says exactly what is known.
    """
    if single:
        filtered = min(others, result.filtered_ports)
        return [
            ("closed", "conn-refused", others - filtered),
            ("filtered", "no-response", filtered),
        ]
    if result.filtered_ports == 0:
        return [("closed", "conn-refused", others)]
    if result.closed_ports == 0:
        return [("filtered", "no-response", others)]
    return [("closed|filtered", None, others)]


def _open_ports(result: ScanResult) -> Iterator[tuple[str, PortResult]]:
    """Open ports with the address each belongs to, in address then port order."""
    addresses = _addresses(result)
    default = addresses[0] if addresses else result.target
    rows = [(port.address or default, port) for port in result.open_ports if port.state == "open"]
    rows.sort(key=lambda row: (address_key(row[0]), row[1].port))
    yield from rows


def _addresses(result: ScanResult) -> list[str]:
    if result.addresses:
        return list(result.addresses)
    seen = list(dict.fromkeys(p.address for p in result.open_ports if p.address is not None))
    if seen:
        return seen
    try:
        return [str(ipaddress.ip_address(result.target))]
    except ValueError:
        return []


def address_key(address: str) -> tuple[int, int, str]:
    """Sorts addresses numerically, IPv4 before IPv6, anything else (a name) after both."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return (9, 0, address)
    return (ip.version, int(ip), "")


def _port_count(result: ScanResult) -> int:
    try:
        return len(parse_port_spec(result.ports))
    except PortSpecError:
        hosts = max(1, len(_addresses(result)))
        return result.total_ports_scanned // hosts


def _hostname(target: str) -> str | None:
    try:
        parsed = parse_target(target)
    except TargetError:
        return None
    return parsed.value if parsed.kind == "hostname" else None


def _addrtype(address: str) -> str:
    return "ipv6" if ":" in address else "ipv4"


def _epoch(moment: datetime) -> int:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def _timestr(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).ctime()


def _xml_text(text: str) -> str:
    return _XML_INVALID.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _csv_text(text: str | None) -> str:
    if text is None:
        return ""
    text = _FORMULA_AFTER_SEPARATOR.sub(r"\1'\2", text)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _own_version() -> str:
    try:
        return package_version("cybersec-scan")
    except PackageNotFoundError:
        return "0"
