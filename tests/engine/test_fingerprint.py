"""Service identification: parsers on canned bytes, live fixture servers, and nmap -sV agreement."""

from __future__ import annotations

import asyncio
import ssl
import struct
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tests import needs
from worker_service.probe import identify as fingerprint
from worker_service.probe.identify import ServiceInfo, identify

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
Serve = Callable[..., Awaitable[int]]

SSH_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
FTP_BANNER = b"220 (vsFTPd 3.0.3)\r\n"
SMTP_BANNER = b"220 mail.example.test ESMTP Postfix (Debian/GNU)\r\n"
MYSQL_VERSION = b"8.0.36"


def mysql_handshake(version: bytes = MYSQL_VERSION) -> bytes:
    payload = b"\x0a" + version + b"\0" + struct.pack("<I", 7) + b"saltsalt\0" + b"\xff\xf7"
    return len(payload).to_bytes(3, "little") + b"\0" + payload


def test_parse_ssh() -> None:
    info = fingerprint.parse_ssh(SSH_BANNER)
    assert info is not None
    assert (info.service, info.product, info.version) == ("ssh", "OpenSSH", "9.2p1")
    assert info.extra == {"protocol": "2.0", "comment": "Debian-2+deb12u3"}


def test_parse_ftp_and_smtp_greetings() -> None:
    ftp = fingerprint.parse_greeting(FTP_BANNER)
    smtp = fingerprint.parse_greeting(SMTP_BANNER)
    exim = fingerprint.parse_greeting(b"220 mx ESMTP Exim 4.96 Tue, 1 Jan 2030\r\n")
    assert ftp == ServiceInfo("ftp", "220 (vsFTPd 3.0.3)", "vsFTPd", "3.0.3")
    assert smtp is not None
    assert (smtp.service, smtp.product) == ("smtp", "Postfix")
    assert exim is not None
    assert (exim.product, exim.version) == ("Exim", "4.96")
    assert fingerprint.parse_greeting(b"220 ready\r\n") is None
    assert fingerprint.parse_220(b"220 ready\r\n", hint="ftp") == ServiceInfo("ftp", "220 ready")


def test_parse_mysql() -> None:
    info = fingerprint.parse_mysql(mysql_handshake())
    assert info is not None
    assert (info.service, info.product, info.version) == (
        "mysql",
        "MySQL",
        "8.0.36",
    )
    message = b"\xff\x6a\x04Host '10.0.0.9' is not allowed to connect"
    error = fingerprint.parse_mysql(len(message).to_bytes(3, "little") + b"\0" + message)
    assert error is not None
    assert error.service == "mysql"
    assert "not allowed" in error.extra["error"]
    assert fingerprint.parse_mysql(b"hello") is None


def test_parse_http() -> None:
    reply = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Length: 0\r\n\r\n"
    info = fingerprint.parse_http(reply)
    assert info is not None
    assert (info.service, info.product, info.version) == ("http", "nginx", "1.22.1")
    assert info.extra == {"status": "HTTP/1.1 200 OK"}
    assert fingerprint.parse_http(b"SSH-2.0-x\r\n") is None


def test_parse_redis() -> None:
    pong = fingerprint.parse_redis(b"+PONG\r\n$30\r\n# Server\r\nredis_version:7.0.15\r\n\r\n")
    assert pong is not None
    assert (pong.service, pong.version) == ("redis", "7.0.15")
    locked = fingerprint.parse_redis(b"-NOAUTH Authentication required.\r\n")
    assert locked is not None
    assert locked.extra == {"auth": "required"}
    assert fingerprint.parse_redis(b"-ERR what\r\n") is None


def test_parse_postgres() -> None:
    assert fingerprint.parse_postgres(b"S") == ServiceInfo(
        "postgresql", None, "PostgreSQL", None, {"ssl": "supported"}
    )
    auth = fingerprint.parse_postgres(b"N", b"R\0\0\0\x0c\0\0\0\x05salt")
    assert auth is not None
    assert auth.service == "postgresql"
    error = b"E\0\0\0\x20SFATAL\0C28000\0Mno pg_hba.conf entry\0\0"
    refused = fingerprint.parse_postgres(b"N", error)
    assert refused is not None
    assert refused.extra["error"] == "no pg_hba.conf entry"
    assert fingerprint.parse_postgres(b"N", b"garbage") is None


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    needs.tool("openssl")
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=fixture.test/O=Cybersec Test",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def test_parse_certificate(certificate: tuple[Path, Path]) -> None:
    der = ssl.PEM_cert_to_DER_cert(certificate[0].read_text())
    fields = fingerprint.parse_certificate(der)
    assert fields["subject"] == "CN=fixture.test, O=Cybersec Test"
    assert fields["issuer"] == fields["subject"]
    assert fields["not_after"] > fields["not_before"]


# --- live fixture servers ---------------------------------------------------------------------


def greeter(banner: bytes) -> Handler:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()
        await reader.read(1024)

    return handle


async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    body = b"<html>fixture</html>"
    writer.write(
        b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nContent-Type: text/html\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()


async def redis_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Enough of Redis for both probes: RESP PING/INFO and inline commands."""
    info = b"# Server\r\nredis_version:7.0.15\r\n"
    while line := await reader.readline():
        words = line.strip().split()
        if words[:1] and words[0].startswith(b"*"):
            count = int(words[0][1:])
            words = []
            for _ in range(count):
                await reader.readline()
                words.append((await reader.readline()).strip())
        command = words[0].upper() if words else b""
        if command == b"PING":
            writer.write(b"+PONG\r\n")
        elif command == b"INFO":
            writer.write(b"$%d\r\n%s\r\n" % (len(info), info))
        elif command == b"GET" and len(words) != 2:
            writer.write(b"-ERR wrong number of arguments for 'get' command\r\n")
        elif command:
            writer.write(b"-ERR unknown command '%s'\r\n" % command.lower())
        await writer.drain()


async def postgres_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readexactly(8)  # SSLRequest
    writer.write(b"N")
    await writer.drain()
    length = int.from_bytes(await reader.readexactly(4), "big")
    await reader.readexactly(length - 4)
    writer.write(b"R" + struct.pack("!ii", 12, 5) + b"salt")  # md5 password, please
    await writer.drain()
    await reader.read(1024)


@pytest.mark.parametrize(
    ("handler", "expected"),
    [
        (greeter(SSH_BANNER), ("ssh", "OpenSSH", "9.2p1")),
        (greeter(FTP_BANNER), ("ftp", "vsFTPd", "3.0.3")),
        (greeter(SMTP_BANNER), ("smtp", "Postfix", None)),
        (greeter(mysql_handshake()), ("mysql", "MySQL", "8.0.36")),
        (http_server, ("http", "nginx", "1.22.1")),
        (redis_server, ("redis", "Redis", "7.0.15")),
        (postgres_server, ("postgresql", "PostgreSQL", None)),
    ],
    ids=["ssh", "ftp", "smtp", "mysql", "http", "redis", "postgresql"],
)
async def test_identify_live(
    serve: Serve, handler: Handler, expected: tuple[str, str, str | None]
) -> None:
    port = await serve(handler)
    info = await identify("127.0.0.1", port, timeout=5)
    assert (info.service, info.product, info.version) == expected


async def test_identify_tls(serve: Serve, certificate: tuple[Path, Path]) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    port = await serve(http_server, ssl=context)
    info = await identify("127.0.0.1", port, timeout=5)
    assert (info.service, info.product) == ("https", "nginx")
    assert info.extra["subject"] == "CN=fixture.test, O=Cybersec Test"
    assert "not_after" in info.extra


async def test_identify_silent_port_falls_back_to_registered_name(serve: Serve) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1024)

    port = await serve(silent)
    info = await identify("127.0.0.1", port, timeout=2)
    assert info.service == (fingerprint.registered_name(port) or "unknown")
    assert info.product is None


# --- agreement with nmap ----------------------------------------------------------------------

NMAP_ALIASES = {"ssl/http": "https", "http-proxy": "http", "postgres": "postgresql"}


@pytest.mark.timeout(110)
async def test_service_names_agree_with_nmap(serve: Serve) -> None:
    needs.tool("nmap")
    handlers = {
        "ssh": greeter(SSH_BANNER),
        "ftp": greeter(FTP_BANNER),
        "smtp": greeter(SMTP_BANNER),
        "http": http_server,
        "redis": redis_server,
    }
    ports = {name: await serve(handler) for name, handler in handlers.items()}
    spec = ",".join(str(port) for port in ports.values())
    nmap = await asyncio.create_subprocess_exec(
        *("nmap", "-sV", "--version-light", "-Pn", "-n", "--max-retries", "1"),
        *("--host-timeout", "90s", "-p", spec, "-oG", "-", "127.0.0.1"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )

    async def identify_all() -> dict[int, str | None]:
        found = {port: identify("127.0.0.1", port, timeout=5) for port in ports.values()}
        return {port: (await info).service for port, info in found.items()}

    # Ours run while nmap waits out its probes: the test costs nmap's time, not both.
    (out, _err), ours = await asyncio.wait_for(
        asyncio.gather(nmap.communicate(), identify_all()), timeout=100
    )
    nmap_names: dict[int, str] = {}
    for line in out.decode().splitlines():
        if "Ports:" not in line:
            continue
        for entry in line.split("Ports:", 1)[1].split("\t")[0].split(","):
            fields = entry.strip().split("/")
            nmap_names[int(fields[0])] = NMAP_ALIASES.get(fields[4], fields[4])
    assert ours == nmap_names
    assert ours == {port: name for name, port in ports.items()}
