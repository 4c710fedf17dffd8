"""A webhook receiver on loopback that verifies every request with ``standardwebhooks``."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


@dataclass(frozen=True, slots=True)
class Received:
    headers: dict[str, str]
    body: bytes
    answered: int


@dataclass
class Receiver:
    port: int
    statuses: list[int] = field(default_factory=list)
    """Answers to give, in order; 200 once they run out."""
    retry_after: str | None = None
    """Sent as ``Retry-After`` with every 429 and 503."""
    secret: str | None = None
    """Set once the webhook is created; requests are verified against it."""
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    scheme: str = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/hook"

    def next_status(self) -> int:
        with self.lock:
            return self.statuses.pop(0) if self.statuses else 200

    def events(self, answered: int | None = 200) -> list[dict[str, Any]]:
        """Verified payloads, of requests answered with ``answered`` (None: all)."""
        assert self.secret is not None
        verifier = Webhook(self.secret)
        with self.lock:
            kept = [r for r in self.received if answered is None or r.answered == answered]
        payloads = []
        for request in kept:
            try:
                payload = verifier.verify(request.body, request.headers)
            except WebhookVerificationError as exc:
                pytest.fail(f"signature did not verify: {exc}: {request.headers}")
            payloads.append(payload)
        return payloads

    def wait_for(self, count: int, answered: int | None = 200, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                got = [r for r in self.received if answered is None or r.answered == answered]
            if len(got) >= count:
                return
            time.sleep(0.05)
        pytest.fail(f"{count} webhook request(s) did not arrive; got {self.received}")


@contextmanager
def webhook_receiver(
    statuses: list[int] | None = None, *, tls: ssl.SSLContext | None = None
) -> Iterator[Receiver]:
    """A receiver on 127.0.0.1 answering ``statuses`` in turn; over TLS with ``tls``."""
    receiver: Receiver

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            body = self.rfile.read(length)
            status = receiver.next_status()
            with receiver.lock:
                receiver.received.append(Received(dict(self.headers.items()), body, status))
            self.send_response(status)
            if status in (429, 503) and receiver.retry_after is not None:
                self.send_header("retry-after", receiver.retry_after)
            if status in (301, 302, 307):
                self.send_header("location", "http://127.0.0.1:1/elsewhere")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    receiver = Receiver(
        port=server.server_address[1],
        statuses=list(statuses or []),
        scheme="http" if tls is None else "https",
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
