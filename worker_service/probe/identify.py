"""Service identification for open ports: greeting banners first, then light probes if silent.

Every step opens its own short connection and the whole identification is bounded by one
timeout, so it can run concurrently with (or after) discovery without slowing it. Parsers are
pure functions of the bytes received, tested without a network.
"""

from __future__ import annotations

import asyncio
import functools
import re
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    service: str | None
    banner: str | None = None
    product: str | None = None
    version: str | None = None
    extra: dict[str, str] = field(default_factory=dict)


_READ_LIMIT: Final = 4096
_BANNER_WAIT: Final = 1.0
"""Longest wait for a greeting; services that speak first do so within milliseconds."""


@functools.cache
def registered_name(port: int) -> str | None:
    """The IANA name of ``port`` from the services database, read once per port and process:
    each ``getservbyport`` reads /etc/services (2% of a worker's CPU on 1-port scans)."""
    with suppress(OSError):
        return socket.getservbyport(port, "tcp")
    return None


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace").strip()


# --- greeting parsers -------------------------------------------------------------------------

_SSH = re.compile(r"^SSH-([\d.]+)-(\S+)(?:[ ]+(.*))?")
_FTP_PRODUCTS = (
    re.compile(r"\((vsFTPd) ([\w.]+)\)"),
    re.compile(r"(ProFTPD) ([\w.]+)"),
    re.compile(r"(FileZilla Server)(?: version)? ([\w.-]+)"),
    re.compile(r"(Pure-FTPd)()"),
)
_SMTP_PRODUCTS = (
    re.compile(r"ESMTP (Exim) ([\w.]+)"),
    re.compile(r"ESMTP (Postfix)()"),
    re.compile(r"ESMTP (Sendmail) ([\w.]+)"),
    re.compile(r"(Microsoft ESMTP MAIL Service)(?:, Version: ([\w.]+))?"),
)


def parse_ssh(data: bytes) -> ServiceInfo | None:
    line = _text(data.split(b"\n", 1)[0])
    match = _SSH.match(line)
    if match is None:
        return None
    protocol, software, comment = match.groups()
    product, _, version = software.partition("_")
    extra = {"protocol": protocol} | ({"comment": comment} if comment else {})
    return ServiceInfo("ssh", line, product, version or None, extra)


def _product(text: str, patterns: tuple[re.Pattern[str], ...]) -> tuple[str | None, str | None]:
    for pattern in patterns:
        match = pattern.search(text)
        if match is not None:
            return match.group(1), match.group(2) or None
    return None, None


def parse_220(data: bytes, hint: str | None = None) -> ServiceInfo | None:
    """FTP and SMTP both greet with "220"; the text, or failing that the port, tells which."""
    text = _text(data)
    if not text.startswith("220"):
        return None
    upper = text.upper()
    if "SMTP" in upper or (hint in {"smtp", "submission"} and "FTP" not in upper):
        product, version = _product(text, _SMTP_PRODUCTS)
        return ServiceInfo("smtp", text, product, version)
    if "FTP" in upper or hint == "ftp":
        product, version = _product(text, _FTP_PRODUCTS)
        return ServiceInfo("ftp", text, product, version)
    return None


def parse_mysql(data: bytes) -> ServiceInfo | None:
    """The server's first packet: a v10 handshake carrying its version, or an error packet."""
    if len(data) < 5:
        return None
    length = int.from_bytes(data[:3], "little")
    payload = data[4 : 4 + length]
    if data[3] != 0 or len(payload) < 2:
        return None
    if payload[0] == 10:
        version = payload[1:].split(b"\0", 1)[0].decode("ascii", errors="replace")
        product = "MariaDB" if "mariadb" in version.lower() else "MySQL"
        return ServiceInfo("mysql", version, product, version, {"protocol": "10"})
    if payload[0] == 0xFF and len(payload) > 3:
        message = _text(payload[3:])
        return ServiceInfo("mysql", message, None, None, {"error": message})
    return None


def parse_greeting(data: bytes, hint: str | None = None) -> ServiceInfo | None:
    """Identify a service from what it sent before we said anything."""
    for parse in (parse_ssh, parse_mysql):
        info = parse(data)
        if info is not None:
            return info
    info = parse_220(data, hint)
    if info is not None:
        return info
    text = _text(data)
    if text.startswith("+OK"):
        return ServiceInfo("pop3", text)
    if text.startswith("* OK"):
        return ServiceInfo("imap", text)
    return None


# --- probe parsers ----------------------------------------------------------------------------

HTTP_PROBE: Final = b"HEAD / HTTP/1.0\r\nUser-Agent: cybersec-scan\r\nAccept: */*\r\n\r\n"
REDIS_PROBE: Final = b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n"
PG_SSL_REQUEST: Final = struct.pack("!ii", 8, 80877103)


def pg_startup(user: str = "cybersec-scan") -> bytes:
    body = struct.pack("!i", 196608) + b"user\0" + user.encode() + b"\0database\0postgres\0\0"
    return struct.pack("!i", len(body) + 4) + body


def parse_http(data: bytes, service: str = "http") -> ServiceInfo | None:
    if not data.startswith(b"HTTP/"):
        return None
    head = _text(data.split(b"\r\n\r\n", 1)[0])
    status, *lines = head.splitlines()
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    server = headers.get("server")
    product = version = None
    if server:
        product, _, rest = server.partition("/")
        version = rest.split(" ", 1)[0] or None
    return ServiceInfo(service, server or status, product or None, version, {"status": status})


def parse_redis(data: bytes) -> ServiceInfo | None:
    text = _text(data)
    if not (text.startswith(("+PONG", "-NOAUTH", "-ERR", "-DENIED"))):
        return None
    if text.startswith("-ERR") and "redis" not in text.lower():
        return None  # plenty of line protocols say -ERR; only a named one counts
    match = re.search(r"redis_version:([\w.]+)", text)
    extra = {"auth": "required"} if text.startswith("-NOAUTH") else {}
    return ServiceInfo("redis", text.splitlines()[0], "Redis", match and match.group(1), extra)


def parse_postgres(ssl_reply: bytes, startup_reply: bytes = b"") -> ServiceInfo | None:
    """The one-byte answer to SSLRequest, then (after "N") the answer to a startup message."""
    if ssl_reply == b"S":
        return ServiceInfo("postgresql", None, "PostgreSQL", None, {"ssl": "supported"})
    if ssl_reply != b"N" or startup_reply[:1] not in (b"R", b"E"):
        return None
    extra = {"ssl": "refused"}
    if startup_reply[:1] == b"E":
        fields = dict(
            (part[:1].decode(errors="replace"), _text(part[1:]))
            for part in startup_reply[5:].split(b"\0")
            if part
        )
        extra["error"] = fields.get("M", "")
    return ServiceInfo("postgresql", None, "PostgreSQL", None, extra)


# --- TLS certificates: just enough DER to report subject, issuer and expiry ---------------------

_NAME_OIDS: Final = {
    b"\x55\x04\x03": "CN",
    b"\x55\x04\x06": "C",
    b"\x55\x04\x07": "L",
    b"\x55\x04\x08": "ST",
    b"\x55\x04\x0a": "O",
    b"\x55\x04\x0b": "OU",
}


def _tlv(der: bytes, at: int) -> tuple[int, int, int]:
    """(tag, start of value, end of value) of the DER element at ``at``."""
    tag, length = der[at], der[at + 1]
    at += 2
    if length & 0x80:
        size = length & 0x7F
        length = int.from_bytes(der[at : at + size], "big")
        at += size
    return tag, at, at + length


def _children(der: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    items = []
    while start < end:
        item = _tlv(der, start)
        items.append(item)
        start = item[2]
    return items


def _name(der: bytes, start: int, end: int) -> str:
    parts = []
    for _set, set_start, set_end in _children(der, start, end):
        for _seq, seq_start, seq_end in _children(der, set_start, set_end):
            (_o, oid_start, oid_end), (_v, value_start, value_end) = _children(
                der, seq_start, seq_end
            )[:2]
            key = _NAME_OIDS.get(der[oid_start:oid_end], der[oid_start:oid_end].hex())
            parts.append(f"{key}={der[value_start:value_end].decode(errors='replace')}")
    return ", ".join(parts)


def _time(tag: int, raw: bytes) -> str:
    text = raw.decode("ascii")
    moment = datetime.strptime(text, "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ")
    return moment.replace(tzinfo=UTC).isoformat()


def parse_certificate(der: bytes) -> dict[str, str]:
    """Subject, issuer and validity of an X.509 certificate in DER form."""
    _tag, start, end = _tlv(der, 0)
    _tag, start, end = _tlv(der, start)  # tbsCertificate
    fields = _children(der, start, end)
    if fields[0][0] == 0xA0:  # explicit version
        fields = fields[1:]
    _serial, _algorithm, issuer, validity, subject = fields[:5]
    (before_tag, b_start, b_end), (after_tag, a_start, a_end) = _children(
        der, validity[1], validity[2]
    )[:2]
    return {
        "subject": _name(der, subject[1], subject[2]),
        "issuer": _name(der, issuer[1], issuer[2]),
        "not_before": _time(before_tag, der[b_start:b_end]),
        "not_after": _time(after_tag, der[a_start:a_end]),
    }


# --- identification ---------------------------------------------------------------------------


async def _exchange(
    address: str,
    port: int,
    payloads: tuple[bytes, ...],
    wait: float,
    *,
    tls: ssl.SSLContext | None = None,
    until: bytes | None = None,
) -> tuple[bytes, ...]:
    """Send each payload and read its answer; answers end at a pause, EOF, or ``until``."""
    answers: list[bytes] = []
    async with asyncio.timeout(wait):
        reader, writer = await asyncio.open_connection(address, port, ssl=tls, limit=_READ_LIMIT)
    try:
        if tls is not None:
            cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
            answers.append(cert or b"")
        for payload in payloads:
            if payload:
                writer.write(payload)
                await writer.drain()
            data = b""
            with suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    while len(data) < _READ_LIMIT and (until is None or until not in data):
                        chunk = await reader.read(_READ_LIMIT - len(data))
                        if not chunk:
                            break
                        data += chunk
            answers.append(data)
            if not data:
                break
    finally:
        writer.close()
        with suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    return tuple(answers)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    # Identification, not trust: any certificate is accepted and then reported. One context per
    # process: building one loads the default ciphers and costs more than the handshake.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


Probe = Callable[[str, int, float], Awaitable[ServiceInfo | None]]


async def probe_http(address: str, port: int, wait: float) -> ServiceInfo | None:
    (answer,) = await _exchange(address, port, (HTTP_PROBE,), wait, until=b"\r\n\r\n")
    return parse_http(answer)


async def probe_tls(address: str, port: int, wait: float) -> ServiceInfo | None:
    try:
        cert, answer = await _exchange(
            address, port, (HTTP_PROBE,), wait, tls=_tls_context(), until=b"\r\n\r\n"
        )
    except (ssl.SSLError, ValueError):
        return None
    info = parse_http(answer, "https") or ServiceInfo("ssl")
    extra = dict(info.extra)
    with suppress(ValueError, IndexError, UnicodeDecodeError):
        extra |= parse_certificate(cert)
    return ServiceInfo(info.service, info.banner, info.product, info.version, extra)


async def probe_redis(address: str, port: int, wait: float) -> ServiceInfo | None:
    (answer,) = await _exchange(address, port, (REDIS_PROBE,), wait)
    return parse_redis(answer)


async def probe_postgres(address: str, port: int, wait: float) -> ServiceInfo | None:
    answers = await _exchange(address, port, (PG_SSL_REQUEST, pg_startup()), wait)
    return parse_postgres(*answers[:2])


_PROBES: Final[dict[str, Probe]] = {
    "http": probe_http,
    "https": probe_tls,
    "redis": probe_redis,
    "postgresql": probe_postgres,
}
_HINTS: Final = {"http-alt": "http", "www": "http", "postgres": "postgresql", "ssl": "https"}


async def _quiet(probe: Probe, address: str, port: int, wait: float) -> ServiceInfo | None:
    """A probe whose failure (refused, reset, its own wait elapsed) just means "not this"."""
    # The overall deadline of identify() arrives here as cancellation, never as TimeoutError.
    with suppress(OSError, TimeoutError):
        return await probe(address, port, wait)
    return None


async def _greeting(address: str, port: int, wait: float) -> tuple[bytes, bool]:
    """What the service says before we do, and whether it then closed the connection."""
    async with asyncio.timeout(wait):
        reader, writer = await asyncio.open_connection(address, port, limit=_READ_LIMIT)
    data = b""
    closed = False
    try:
        with suppress(TimeoutError):
            async with asyncio.timeout(wait):
                while len(data) < _READ_LIMIT:
                    chunk = await reader.read(_READ_LIMIT - len(data))
                    if not chunk:
                        closed = True
                        break
                    data += chunk
    finally:
        writer.close()
        with suppress(OSError):
            await writer.wait_closed()
    return data, closed


TCPWRAPPED: Final = "tcpwrapped"
"""nmap -sV's name for a port that accepts, then closes before saying or hearing anything (TCP
wrappers, a proxy with no backend): nothing behind it can be identified, so nothing is probed."""


async def identify(address: str, port: int, *, timeout: float) -> ServiceInfo:
    """Name the service on an open port within ``timeout`` seconds (never raises for the
    target's behaviour; falls back to the registered name for the port)."""
    hint = registered_name(port)
    found: ServiceInfo | None = None
    banner: str | None = None
    with suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            wait = min(_BANNER_WAIT, timeout / 3)
            with suppress(OSError, TimeoutError):
                greeting, closed = await _greeting(address, port, wait)
                if closed and not greeting:
                    return ServiceInfo(TCPWRAPPED)
                if greeting:
                    banner = _text(greeting)[:256]
                    found = parse_greeting(greeting, hint)
            if banner is None:
                first = _HINTS.get(hint or "", hint)
                order = sorted(_PROBES, key=lambda name: name != first)
                # Each probe has its own connection, so they run side by side: a silent port
                # costs one probe wait, not one per probe. The likeliest protocol wins ties.
                answers = await asyncio.gather(
                    *(_quiet(_PROBES[n], address, port, wait) for n in order)
                )
                found = next((answer for answer in answers if answer is not None), None)
    if found is not None:
        return found
    return ServiceInfo(hint or "unknown", banner)
