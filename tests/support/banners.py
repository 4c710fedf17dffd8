"""Loopback listeners that greet every connection with a chosen banner, like SSH or SMTP do."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def banner_listener(
    banner: bytes, *, address: str = "127.0.0.1", bound: socket.socket | None = None
) -> Iterator[int]:
    """A loopback port that sends ``banner`` to whoever connects, then closes.

    ``bound`` is a socket already bound (to keep its port closed until now); it starts
    listening here and is closed at the end like a socket made here.
    """
    server = bound or socket.socket()
    if bound is None:
        server.bind((address, 0))
    server.listen()
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                conn.sendall(banner)

    thread = threading.Thread(target=serve, name="banner-listener", daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
